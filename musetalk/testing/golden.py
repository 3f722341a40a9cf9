"""Golden verifier: ``python -m musetalk.testing.golden DIR [DIR ...]``.

Each DIR is one golden set (see ``shared/golden/README.md``). The kind of set is recognised from the
golden file it holds; the matching verifier runs our implementation from the set's own inputs and
prints one line per stage with the error measure, tolerance and PASS / FAIL / NOT COVERED.
Exit status: 0 when every stage of every set passed, 1 otherwise (NOT COVERED counts as not passed).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from musetalk.testing.golden_common import StageResult, not_covered

# golden file -> (set kind, "module:function" of its verifier)
VERIFIERS: dict[str, tuple[str, str]] = {
    "golden.npz": ("musetalk", "musetalk.testing.golden_musetalk:verify"),
    "golden_dwpose.npz": ("dwpose", "musetalk.testing.golden_dwpose:verify"),
    "golden_syncnet.npz": ("syncnet", "musetalk.testing.golden_syncnet:verify"),
    "golden_lse_crop.npz": ("lse-crop", "musetalk.testing.golden_lse_crop:verify"),
}
BACKEND_KINDS = {"musetalk"}  # sets whose verifier runs the UNet + VAE, on the backend asked for


def verify_set(set_dir: Path, backend: str = "torch",
               groups: list[str] | None = None) -> tuple[str, list[StageResult]]:
    """Verify one golden set; returns its kind and the per-stage results.

    ``backend`` (torch | mlx) picks the UNet + VAE implementation of MuseTalk sets, ``groups`` their stage groups
    (default all, see ``golden_musetalk.STAGE_GROUPS``); other kinds ignore both.
    """
    for filename, (kind, target) in VERIFIERS.items():
        if (set_dir / filename).is_file():
            module_name, func_name = target.split(":")
            try:
                module = importlib.import_module(module_name)
            except ModuleNotFoundError as exc:
                if exc.name and exc.name.startswith("musetalk"):
                    return kind, [not_covered(kind, f"no implementation yet ({module_name})")]
                raise
            kwargs = {"backend": backend, "groups": groups} if kind in BACKEND_KINDS else {}
            return kind, getattr(module, func_name)(set_dir, **kwargs)
    return "unknown", [StageResult("set", "n/a", float("nan"), "n/a", False,
                                   f"no known golden file in {set_dir} (expected one of {sorted(VERIFIERS)})")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m musetalk.testing.golden", description=__doc__.splitlines()[0])
    parser.add_argument("sets", nargs="+", type=Path, help="golden set folders")
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"],
                        help="UNet + VAE implementation for MuseTalk sets (default torch)")
    parser.add_argument("--stages", default=None, metavar="GROUPS",
                        help="comma-separated stage groups of MuseTalk sets (audio, faces, models, parsing, blending, "
                             "chained; default all): e.g. models,chained to check a backend's UNet + VAE alone")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.stages.split(",") if g.strip()] if args.stages else None
    if args.backend == "mlx":
        from musetalk.errors import InputError
        from musetalk.stages.mlx import resolve_backend

        try:
            resolve_backend("mlx")
        except InputError as exc:
            print(f"error: {exc.message} (fix: {exc.fix})", file=sys.stderr)
            return 2
    all_passed = True
    for set_dir in args.sets:
        if not set_dir.is_dir():
            print(f"FAIL        {set_dir}: not a folder", flush=True)
            all_passed = False
            continue
        try:
            kind, results = verify_set(set_dir, args.backend, groups)
        except ValueError as exc:  # an unknown stage group
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"== {set_dir} ({kind}{', backend ' + args.backend if kind in BACKEND_KINDS else ''})", flush=True)
        for result in results:
            print("  " + result.line(), flush=True)
        ok = bool(results) and all(r.passed is True for r in results)
        print(f"  -> {'PASS' if ok else 'FAIL'}: {sum(r.passed is True for r in results)}/{len(results)} stages passed",
              flush=True)
        all_passed &= ok
    return 0 if all_passed else 1


if __name__ == "__main__":
    sys.exit(main())
