"""The stream: avatars prepared once, frames flowing through generators, atomic H.264 + AAC output."""
