"""Prepared avatars as server resources: :class:`AvatarStore` behind POST/GET/DELETE /avatars.

An avatar is prepared once from an uploaded source (the same sniffing, size limit and settings fields as
/generate) and kept by the server until it is deleted or the server stops; live sessions
(``musetalk.frontends.server.live``) run on it. Each avatar lives in a temporary folder that its ``Avatar`` owns
(the upload itself is removed as soon as the avatar is made), so nothing outlives the server. Avatars made here
are not the CLI's named avatars: a client cannot list or delete what the CLI cached.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from musetalk.config import GenerationConfig
from musetalk.errors import MuseTalkError
from musetalk.frontends.server.errors import ApiError, redact
from musetalk.frontends.server.uploads import check_media_limits, store_upload

if TYPE_CHECKING:
    from musetalk.frontends.server.jobs import GenerationService
    from musetalk.stream.avatar import Avatar

log = logging.getLogger("musetalk.frontends.server")
AVATAR_ID_PATTERN = r"^[0-9a-f]{32}$"


@dataclass(eq=False)
class ServerAvatar:
    """One prepared avatar held by the server."""

    id: str
    avatar: "Avatar"
    version: str
    fields: dict[str, Any]  # the settings fields it was made with (batch_size etc. reused by live sessions)
    created_at: float = field(default_factory=time.time)
    in_use: int = 0  # live sessions running on it

    def describe(self) -> dict[str, Any]:
        """The JSON body of GET /avatars/{id}."""
        meta = self.avatar.meta
        return {"id": self.id, "version": self.version, "frames": meta.num_frames, "faces": meta.faces,
                "fps": meta.fps, "width": meta.width, "height": meta.height, "created_at": self.created_at,
                "in_use": self.in_use, "settings": self.fields, "live_url": f"/avatars/{self.id}/live"}


class AvatarStore:
    """The server's prepared avatars (at most ``max_avatars``). Thread-safe; preparations run one at a time."""

    def __init__(self, service: "GenerationService", max_avatars: int = 16) -> None:
        self.service = service
        self.max_avatars = max_avatars
        self._lock = threading.Lock()
        self._prepare_lock = threading.Lock()  # one preparation at a time: they are heavy, and share the device
        self._avatars: dict[str, ServerAvatar] = {}
        self._closed = False

    def create(self, config: GenerationConfig, fields: dict[str, Any], source: IO[bytes]) -> ServerAvatar:
        """Store the upload, prepare the avatar, drop the upload. ApiError 415/422/429/503 on failure."""
        self._check_room()
        self.service.check_version(config.version)
        assert self.service.root is not None, "start() the service first"
        folder = Path(tempfile.mkdtemp(prefix="avatar-upload-", dir=self.service.root))
        try:
            path, _ = store_upload(source, folder, "source")
            # the source limits of /generate (pixels, frames, seconds; headers only). The source stands in for the
            # audio too: a source within max_source_seconds (900 s by default) passes the audio check
            check_media_limits(path, path, self.service.settings)
            with self._prepare_lock:
                self._check_room()
                pipe = self.service.pipeline(config.version)
                try:
                    avatar = pipe.prepare_avatar(path, config)  # a temporary avatar: it owns its folder
                except MuseTalkError as exc:
                    raise redact(exc, folder) from None
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        record = ServerAvatar(uuid.uuid4().hex, avatar, config.version, fields)
        with self._lock:
            if self._closed:
                avatar.close()
                raise ApiError(503, "shutting_down", "the server is shutting down", "retry when it is back")
            self._avatars[record.id] = record
        log.info("avatar %s prepared (%d frames, %s)", record.id, avatar.meta.num_frames, config.version)
        return record

    def _check_room(self) -> None:
        with self._lock:
            if self._closed:
                raise ApiError(503, "shutting_down", "the server is shutting down", "retry when it is back")
            if len(self._avatars) >= self.max_avatars:
                raise ApiError(429, "too_many_avatars", f"this server holds at most {self.max_avatars} avatars",
                               "DELETE /avatars/{id} one you no longer need")

    def get(self, avatar_id: str) -> ServerAvatar:
        """The avatar, or ApiError 404."""
        with self._lock:
            record = self._avatars.get(avatar_id)
        if record is None:
            raise ApiError(404, "unknown_avatar", f"no avatar {avatar_id} on this server (unknown or deleted)",
                           "POST /avatars with a source to make one; GET /avatars lists them")
        return record

    def list(self) -> list[ServerAvatar]:
        """Every avatar, oldest first."""
        with self._lock:
            return sorted(self._avatars.values(), key=lambda r: r.created_at)

    def acquire(self, avatar_id: str) -> ServerAvatar:
        """Mark the avatar in use by a live session (DELETE answers 409 meanwhile); 404 when unknown."""
        with self._lock:
            record = self._avatars.get(avatar_id)
            if record is not None:
                record.in_use += 1
                return record
        return self.get(avatar_id)  # raises the 404

    def release(self, record: ServerAvatar) -> None:
        """A live session on it ended."""
        with self._lock:
            record.in_use -= 1

    def delete(self, avatar_id: str) -> ServerAvatar:
        """Forget the avatar and remove its folder; 409 while a live session uses it."""
        with self._lock:
            record = self._avatars.get(avatar_id)
            if record is not None and record.in_use:
                raise ApiError(409, "avatar_in_use", f"avatar {avatar_id} is in a live session",
                               "end the session (or wait for it to end), then delete the avatar")
            if record is not None:
                del self._avatars[avatar_id]
        if record is None:
            return self.get(avatar_id)  # raises the 404
        record.avatar.close()
        log.info("avatar %s deleted", avatar_id)
        return record

    def close(self) -> None:
        """Server stop: remove every avatar folder. Idempotent."""
        with self._lock:
            self._closed = True
            records = list(self._avatars.values())
            self._avatars.clear()
        for record in records:
            record.avatar.close()
