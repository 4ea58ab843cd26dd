"""Drop-in plugins: a folder (``[plugins] folder``) whose plugins load at start-up beside the
installed ones, as DSF administrators drop a plugin jar into the BPE's ``process`` folder.

The folder holds, side by side:

- plugin folders: ``plugin.toml`` (``name``, ``version`` ``a.b.c.d``, ``release_date``, and
  ``module``, the Python module with the plugin's handlers), the BPMN files and FHIR resources
  anywhere below it (laid out as :func:`~dsf_bridge.plugins.loader.plugin_from_folder` reads
  them: ``bpe/*.bpmn``, ``fhir/<Type>/*.xml|json``), and the module, ``<module>.py`` or a
  package ``<module>/__init__.py``, which defines ``handlers``, a
  :class:`~dsf_bridge.plugins.registry.HandlerRegistry` (a plugin of BPMN without Python
  handlers names no module);
- wheel files (``*.whl``) of plugin packages that declare a ``dsf_bridge.plugins`` entry point,
  exactly as they would be installed; their dependencies must already be installed.

Each plugin passes the checks an installed plugin passes when the bridge loads it (placeholders
replaced, models parsed and validated, every handler registered, FHIR resources readable) and
those of ``dsf-bridge plugins check`` on each of its files; its plugin name and process keys
must not be taken by an installed plugin or an earlier drop-in (in name order). A plugin that
fails, or whose module fails to import, is logged at error (``plugin.rejected``) and left out;
it never stops the others.

Trust: the folder is trusted like site-packages, since the code in it runs inside the bridge
with the bridge's rights. Only the module ``plugin.toml`` names (a wheel: the module its entry
point names) is imported, and it imports what it wants; nothing else in the folder is executed.
A world-writable folder is refused (:class:`~dsf_bridge.errors.ConfigError`), a plugin with
anything world-writable in it (below a plugin folder, links followed) is rejected, and a plugin
folder whose name is taken is rejected before its module is imported; owner-only permissions
(``chmod 700``, owned by the bridge's user) are recommended. A wheel is unpacked to a private
temporary folder (removed at exit) that goes to the end of ``sys.path``: its modules never
shadow installed ones (a wheel that would is rejected), and its entry points are not unpacked,
so it is not mistaken for an installed plugin.
"""

from __future__ import annotations

import atexit
import configparser
import importlib.util
import itertools
import re
import shutil
import stat
import sys
import tempfile
import tomllib
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import date
from importlib.metadata import EntryPoint
from pathlib import Path, PurePosixPath
from types import ModuleType

import structlog

from dsf_bridge.engine import parse_bpmn_file
from dsf_bridge.errors import BridgeError, ConfigError, ProcessModelError
from dsf_bridge.plugins.api import ProcessPlugin
from dsf_bridge.plugins.check import DEFAULT_ORGANIZATION, check_paths
from dsf_bridge.plugins.loader import (
    ENTRY_POINT_GROUP,
    discover_plugins,
    load_entry_point,
    plugin_from_folder,
)
from dsf_bridge.plugins.registry import HandlerRegistry

__all__ = ["MANIFEST", "DropInPlugins", "RejectedPlugin", "load_plugin_folder", "site_plugins"]

log = structlog.get_logger("dsf_bridge.plugins")

MANIFEST = "plugin.toml"
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_MANIFEST_KEYS = frozenset({"name", "version", "release_date", "module"})
# A wheel unpacked bigger than this is refused (a plugin is models, resources and a little code).
MAX_WHEEL_BYTES = 200 * 1024 * 1024
_SUFFIXES = itertools.count(2)  # of drop-in module names a plugin's own name would repeat


@dataclass(frozen=True)
class RejectedPlugin:
    """A drop-in that was left out, and why."""

    source: Path
    reason: str


@dataclass
class DropInPlugins:
    """What a plugins folder gave: the plugins that passed (with where each came from) and the
    ones left out."""

    folder: Path
    plugins: list[ProcessPlugin] = field(default_factory=list)
    sources: dict[str, Path] = field(default_factory=dict)
    rejected: list[RejectedPlugin] = field(default_factory=list)


def _world_writable(path: Path) -> bool:
    return bool(path.stat().st_mode & stat.S_IWOTH)


def _world_writable_in(entry: Path) -> Path | None:
    """The first path of a drop-in (the wheel, or the plugin folder and everything below it)
    that every user may change: the file or folder a path names (links followed), or, for a
    symbolic link, the folder holding its target (unless sticky, as /tmp is). A linked folder
    is checked, not walked (a link to a big shared folder costs no walk). None when there is
    none."""
    pending = [entry]
    while pending:
        path = pending.pop()
        status = path.stat()
        if status.st_mode & stat.S_IWOTH:
            return path
        linked = path.is_symlink()
        if linked:
            holder = path.resolve().parent.stat().st_mode
            if holder & stat.S_IWOTH and not holder & stat.S_ISVTX:
                return path
        if stat.S_ISDIR(status.st_mode) and (not linked or path == entry):
            pending.extend(sorted(path.iterdir()))
    return None


def load_plugin_folder(
    folder: Path,
    *,
    installed: Sequence[ProcessPlugin] = (),
    unpack_to: Path | None = None,
) -> DropInPlugins:
    """Load every plugin in ``folder`` that passes its checks; see the module docstring.

    ``installed`` are the plugins already loaded (their names and process keys are taken);
    wheels are unpacked below ``unpack_to`` (default: a temporary folder removed at exit).
    Raises :class:`ConfigError` when the folder is missing, not a folder or world-writable.
    """
    if not folder.is_dir():
        raise ConfigError(f"plugins.folder: {folder} is not a folder", field="plugins.folder")
    if _world_writable(folder):
        raise ConfigError(
            f"plugins.folder: {folder} is writable by every user; its code would run inside "
            f"the bridge: chmod o-w {folder} (owner-only, chmod 700, is recommended)",
            field="plugins.folder",
        )
    result = DropInPlugins(folder)
    names = {plugin.name for plugin in installed}
    keys = {key for plugin in installed for key in _process_keys(plugin)}
    unpacked: Path | None = unpack_to
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            kind = "folder"
        elif entry.is_file() and entry.suffix == ".whl":
            kind = "wheel"
        else:
            continue  # a README or the like: not a plugin
        try:
            writable = _world_writable_in(entry)
            if writable is not None:
                raise ProcessModelError(f"{writable} is writable by every user (chmod o-w)")
            if kind == "folder":
                found = [_folder_plugin(entry, names, lambda p: _check(p, names, keys))]
            else:
                if unpacked is None:
                    unpacked = _private_temporary_folder()
                found = _wheel_plugins(entry, unpacked, _checker(names, keys))
        except KeyboardInterrupt:
            raise
        except BaseException as exc:  # a plugin's import may raise anything (CancelledError...)
            reason = str(exc) if isinstance(exc, BridgeError) else f"{type(exc).__name__}: {exc}"
            result.rejected.append(RejectedPlugin(entry, reason))
            log.error("plugin.rejected", source=str(entry), reason=reason)
            continue
        for plugin in found:
            names.add(plugin.name)
            keys.update(_process_keys(plugin))
            result.plugins.append(plugin)
            result.sources[plugin.name] = entry
            log.info("plugin.found", plugin=plugin.name, version=plugin.version, source=str(entry))
    return result


def _private_temporary_folder() -> Path:
    path = Path(tempfile.mkdtemp(prefix="dsf-bridge-wheels-"))  # mode 0700
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


def _process_keys(plugin: ProcessPlugin) -> set[str]:
    return {p.key for path in plugin.bpmn_files for p in parse_bpmn_file(path).processes}


def _checker(names: set[str], keys: set[str]) -> Callable[[ProcessPlugin], None]:
    """:func:`_check` for the plugins of one wheel: each also against the ones before it in
    the wheel (two entry points naming one plugin, or two plugins running one process)."""
    names, keys = set(names), set(keys)

    def check(plugin: ProcessPlugin) -> None:
        _check(plugin, names, keys)
        names.add(plugin.name)
        keys.update(_process_keys(plugin))

    return check


def _check(plugin: ProcessPlugin, names: set[str], keys: set[str]) -> None:
    """The checks of an installed plugin at load, and of ``plugins check`` on its files."""
    if plugin.name in names:
        raise ProcessModelError(f"plugin name {plugin.name!r} is already taken")
    files = [*plugin.bpmn_files, *{p for paths in plugin.fhir_resources.values() for p in paths}]
    report = check_paths(
        files,
        version=plugin.resource_version,
        date=plugin.release_date.isoformat(),
        organization=DEFAULT_ORGANIZATION,
    )
    problems = [f"{r.path}: {'; '.join(r.problems)}" for r in report.files if not r.valid]
    if problems:
        raise ProcessModelError(f"plugin {plugin.name!r}: " + " | ".join(problems))
    loaded = plugin.load(organization=DEFAULT_ORGANIZATION)
    taken = sorted(set(loaded.definitions) & keys)
    if taken:
        raise ProcessModelError(
            f"plugin {plugin.name!r}: process {', '.join(taken)} is already run by another plugin"
        )


def _manifest(folder: Path) -> dict[str, object]:
    path = folder / MANIFEST
    if not path.is_file():
        raise ProcessModelError(
            f"{folder}: no {MANIFEST} (name, version, release_date, module); see "
            "docs/operations.md, Plugins"
        )
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProcessModelError(f"{path}: not valid TOML: {exc}") from exc
    unknown = sorted(set(data) - _MANIFEST_KEYS)
    if unknown:
        raise ProcessModelError(f"{path}: unknown keys {', '.join(unknown)}")
    for key in ("name", "version", "release_date"):
        if key not in data:
            raise ProcessModelError(f"{path}: {key} is missing")
    return data


def _folder_plugin(
    folder: Path, names: set[str], check: Callable[[ProcessPlugin], None]
) -> ProcessPlugin:
    """The plugin of a plugin folder, passed through ``check``. Its name is checked before
    its module is imported (a second copy of a plugin runs no code), and a plugin that fails
    leaves nothing in ``sys.modules``."""
    data = _manifest(folder)
    path = folder / MANIFEST
    release = data["release_date"]
    if isinstance(release, str):
        try:
            release = date.fromisoformat(release)
        except ValueError as exc:
            raise ProcessModelError(f"{path}: release_date: {exc}") from exc
    if not isinstance(release, date):
        raise ProcessModelError(f"{path}: release_date must be a date, YYYY-MM-DD")
    name, version, module = data["name"], data["version"], data.get("module")
    if not isinstance(name, str) or not isinstance(version, str):
        raise ProcessModelError(f"{path}: name and version must be strings")
    if name in names:
        raise ProcessModelError(f"plugin name {name!r} is already taken")
    if module is not None and (not isinstance(module, str) or not _MODULE_NAME.match(module)):
        raise ProcessModelError(f"{path}: module must be a Python module name, not {module!r}")
    handlers = HandlerRegistry()
    imported: str | None = None
    try:
        if module is not None:
            found = _import_from_folder(folder, module, name)
            imported = found.__name__
            registry = getattr(found, "handlers", None)
            if not isinstance(registry, HandlerRegistry):
                raise ProcessModelError(
                    f"{folder / module}: defines no 'handlers' (a HandlerRegistry), found "
                    f"{type(registry).__name__}"
                )
            handlers = registry
        plugin = plugin_from_folder(
            folder, name=name, version=version, release_date=release, handlers=handlers
        )
        check(plugin)
    except BaseException:
        if imported is not None:
            _forget_modules(imported)
        raise
    return plugin


def _forget_modules(top: str) -> None:
    """Remove module ``top`` and its submodules from ``sys.modules``."""
    for loaded in [m for m in sys.modules if m == top or m.startswith(f"{top}.")]:
        sys.modules.pop(loaded, None)


def _import_from_folder(folder: Path, module: str, plugin: str) -> ModuleType:
    """Import ``module`` (a file or a package in ``folder``) under a name of its own, without
    putting the folder on ``sys.path``: nothing else in it can be imported by accident."""
    package = folder / module / "__init__.py"
    single = folder / f"{module}.py"
    # Its own name, never one an earlier drop-in's module holds ("a-b" and "a_b" would both
    # be dsf_bridge_dropin_a_b): a package's submodules are found by it in sys.modules.
    base = unique = "dsf_bridge_dropin_" + re.sub(r"\W", "_", plugin)
    while any(m == unique or m.startswith(f"{unique}.") for m in sys.modules):
        unique = f"{base}_{next(_SUFFIXES)}"
    if package.is_file():
        spec = importlib.util.spec_from_file_location(
            unique, package, submodule_search_locations=[str(package.parent)]
        )
    elif single.is_file():
        spec = importlib.util.spec_from_file_location(unique, single)
    else:
        raise ProcessModelError(f"{folder}: module {module!r}: no {single.name}, no package")
    if spec is None or spec.loader is None:  # pragma: no cover - a .py file always has one
        raise ProcessModelError(f"{folder}: cannot import {module!r}")
    loaded = importlib.util.module_from_spec(spec)
    sys.modules[unique] = loaded  # dataclasses and relative imports look themselves up there
    try:
        spec.loader.exec_module(loaded)
    except BaseException:
        _forget_modules(unique)
        raise
    return loaded


def _wheel_plugins(
    wheel: Path, unpack_to: Path, check: Callable[[ProcessPlugin], None]
) -> list[ProcessPlugin]:
    """The plugins a wheel's ``dsf_bridge.plugins`` entry points name, its files unpacked,
    each passed through ``check``; a wheel that fails leaves nothing on ``sys.path``."""
    try:
        archive = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ProcessModelError(f"{wheel}: not a wheel: {exc}") from exc
    with archive:
        members = archive.infolist()
        names = [PurePosixPath(member.filename) for member in members]
        if any(n.is_absolute() or ".." in n.parts or not n.parts for n in names):
            raise ProcessModelError(f"{wheel}: a file name leaves the wheel (absolute or ..)")
        if sum(member.file_size for member in members) > MAX_WHEEL_BYTES:
            raise ProcessModelError(f"{wheel}: unpacks to more than {MAX_WHEEL_BYTES} bytes")
        entry_files = [n for n in names if len(n.parts) == 2 and n.parts[0].endswith(".dist-info")]
        points_file = next((n for n in entry_files if n.name == "entry_points.txt"), None)
        if not any(n.name == "WHEEL" for n in entry_files):
            raise ProcessModelError(f"{wheel}: no .dist-info/WHEEL: not a wheel")
        points = configparser.ConfigParser(interpolation=None)
        if points_file is not None:
            points.read_string(archive.read(str(points_file)).decode("utf-8"))
        if not points.has_section(ENTRY_POINT_GROUP) or not points.items(ENTRY_POINT_GROUP):
            raise ProcessModelError(f"{wheel}: declares no {ENTRY_POINT_GROUP!r} entry point")
        declared = dict(points.items(ENTRY_POINT_GROUP))
        top_level = {n.parts[0].removesuffix(".py") for n in names if not _metadata(n)}
        shadowing = sorted(t for t in top_level if importlib.util.find_spec(t) is not None)
        if shadowing:
            raise ProcessModelError(
                f"{wheel}: its modules {', '.join(shadowing)} already exist in the bridge's "
                "environment; install it instead, or rename them"
            )
        target = unpack_to / wheel.stem
        target.mkdir()
        for member, name in zip(members, names, strict=True):
            if name == points_file or member.is_dir():
                continue  # entry points unpacked would make it an installed plugin
            destination = target.joinpath(*name.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            destination.write_bytes(archive.read(member))
    sys.path.append(str(target))
    try:
        plugins = [
            load_entry_point(EntryPoint(name, value, ENTRY_POINT_GROUP), f"{wheel}: ")
            for name, value in sorted(declared.items())
        ]
        for plugin in plugins:
            check(plugin)
        return plugins
    except BaseException:
        sys.path.remove(str(target))
        for module in [m for m in sys.modules if m.split(".", 1)[0] in top_level]:
            sys.modules.pop(module, None)
        raise


def _metadata(name: PurePosixPath) -> bool:
    return name.parts[0].endswith((".dist-info", ".data"))


def site_plugins(folder: Path | None) -> tuple[list[ProcessPlugin], DropInPlugins | None]:
    """The installed plugins and, with a plugins folder, its drop-ins that pass their checks;
    and what the folder gave (None without one)."""
    installed = discover_plugins()
    if folder is None:
        return installed, None
    dropins = load_plugin_folder(folder, installed=installed)
    return [*installed, *dropins.plugins], dropins
