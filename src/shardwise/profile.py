"""`shardwise install-profile`: make `snakemake --profile slurm` find this project's SLURM profile.

Snakemake resolves a bare profile name in the current directory (`./slurm`), then in its user
config dir (`~/.config/snakemake/slurm` on Linux, `$XDG_CONFIG_HOME/snakemake` when set), then the
site dir — never in `profiles/`. This links `profiles/slurm` into the user config dir once.
"""

from __future__ import annotations

import shlex
from pathlib import Path

from shardwise.errors import ShardwiseError


def profiles_dir() -> Path:
    """The workflow's profiles/: in the working directory (the workflow you run), else next to
    this package's source tree (an editable install)."""
    for candidate in (Path.cwd() / "profiles", Path(__file__).resolve().parents[2] / "profiles"):
        if candidate.is_dir():
            return candidate
    return Path.cwd() / "profiles"


def user_profile_dir() -> Path:
    """Where Snakemake looks for user profiles (the same platformdirs call Snakemake makes)."""
    from platformdirs import AppDirs

    return Path(AppDirs("snakemake", "snakemake").user_config_dir)


def install_profile(name: str = "slurm", dest_dir: Path | None = None) -> tuple[Path, bool]:
    """Symlink profiles/<name> to <user config dir>/<name>; return (link, created).

    Refuses to replace anything that is not already this same link."""
    profiles = profiles_dir()
    source = profiles / name
    if not (source / "config.yaml").is_file():
        raise ShardwiseError(f"no profile {name!r} in {profiles} (run this in the workflow's directory)")
    link = (dest_dir or user_profile_dir()) / name
    if link.is_symlink() and link.resolve() == source.resolve():
        return link, False
    if link.exists() or link.is_symlink():
        what = f"a link to {link.readlink()}" if link.is_symlink() else "a different profile"
        raise ShardwiseError(
            f"{link} already exists ({what}); not replacing it. Remove it, or use "
            f"`snakemake --profile {shlex.quote(str(source))}` instead"
        )
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(source.resolve(), target_is_directory=True)
    return link, True
