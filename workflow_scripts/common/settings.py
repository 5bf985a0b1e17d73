"""A job's settings: one JSON object, completed with the defaults of schemas/config.schema.yaml, checked
against that schema once, and handed to the code as a frozen, attribute-readable structure.

The schema is the only place a default is written. A rule passes the settings its command uses as
one JSON string (so a changed setting re-runs exactly the jobs that use it); a person running a
command by hand passes only the keys they want to change, and the schema fills in the rest.
"""
from __future__ import annotations

import copy
import functools
import json
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

from workflow_scripts.common import cli

SCHEMA_FILE = Path(__file__).resolve().parents[2] / "schemas" / "config.schema.yaml"


@functools.lru_cache(maxsize=1)
def schema() -> dict:
    """The workflow's config schema (read once)."""
    import yaml

    if not SCHEMA_FILE.is_file():
        raise cli.PipelineError(f"{SCHEMA_FILE} is missing: the settings' defaults and checks live there; run the "
                                "command from a checkout of the workflow (or reinstall it)")
    return yaml.safe_load(SCHEMA_FILE.read_text())


def section_schema(section: str) -> dict:
    """The schema of a dotted config section; ``*`` steps into a map's entries (``experiments.*``)."""
    node = schema()
    for key in section.split("."):
        if key == "*" or key not in node.get("properties", {}):
            node = node.get("additionalProperties")  # a map's entry (experiments.<name>, qc.thresholds.<metric>)
        else:
            node = node["properties"][key]
        if not isinstance(node, dict):
            raise KeyError(f"{section} is not a section of {SCHEMA_FILE.name}")
    return node


def with_defaults(node: Mapping[str, Any], values: Any) -> Any:
    """``values`` with every missing key of ``node`` (a schema) set to its default, nested objects and the
    objects of arrays included."""
    if node.get("type") == "array" and isinstance(node.get("items"), Mapping) and isinstance(values, list):
        return [with_defaults(node["items"], item) for item in values]
    if node.get("type") != "object" or "properties" not in node:
        return copy.deepcopy(values)
    filled = dict(values or {})
    for key, sub in node["properties"].items():
        if key not in filled and "default" in sub:
            filled[key] = copy.deepcopy(sub["default"])
        if key in filled and isinstance(filled[key], (Mapping, list)):
            filled[key] = with_defaults(sub, filled[key])
    return filled


class Settings(Mapping):
    """A frozen, checked settings object: ``s.lr_head`` or ``s["lr_head"]``; nested sections are Settings."""

    __slots__ = ("_values", "_where")

    def __init__(self, values: Mapping[str, Any], where: str = "") -> None:
        object.__setattr__(self, "_where", where)
        object.__setattr__(self, "_values", {k: _frozen(v, f"{where}.{k}" if where else k) for k, v in values.items()})

    def __getitem__(self, key: str) -> Any:
        return self._values[key]

    def __getattr__(self, key: str) -> Any:
        try:
            return self._values[key]
        except KeyError:
            raise AttributeError(f"{self._where or 'settings'} has no key {key!r}; its keys are "
                                 f"{', '.join(sorted(self._values))}") from None

    def __setattr__(self, key: str, value: Any) -> None:
        raise AttributeError(f"settings are frozen: {self._where or 'settings'}.{key} cannot be changed")

    def __iter__(self) -> Iterator[str]:
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Settings({self._where or 'settings'}: {json.dumps(self.plain(), sort_keys=True)})"

    def plain(self) -> dict:
        """The settings as plain JSON values (dicts and lists)."""
        return {k: _plain(v) for k, v in self._values.items()}


def _frozen(value: Any, where: str) -> Any:
    """Mappings as Settings and lists as tuples, all the way down."""
    if isinstance(value, Mapping):
        return Settings(value, where)
    if isinstance(value, list):
        return tuple(_frozen(v, f"{where}.{i}") for i, v in enumerate(value))
    return value


def _plain(value: Any) -> Any:
    """``_frozen``'s inverse: plain JSON values."""
    if isinstance(value, Settings):
        return value.plain()
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def resolve(section: str, values: Any = None, where: str | None = None) -> Any:
    """``values`` of config ``section`` completed with the schema's defaults and checked against it: a Settings
    for an object section, the plain value for any other.

    An error names the key, the value and what the schema expects, e.g.
    ``train.lr_head = 'fast': 'fast' is not of type 'number'``.
    """
    import jsonschema

    node = section_schema(section)
    if values is None and "default" in node:
        values = copy.deepcopy(node["default"])
    filled = with_defaults(node, values)
    where = where or section
    checked = {**node, "definitions": schema().get("definitions", {})}
    errors = sorted(jsonschema.Draft202012Validator(checked).iter_errors(filled), key=lambda e: list(e.path))
    if errors:
        raise cli.PipelineError("; ".join(
            f"{'.'.join([where, *map(str, e.path)])} = {json.dumps(e.instance)}: {e.message}" for e in errors))
    return Settings(filled, where) if isinstance(filled, Mapping) else filled


def load_json(text: str) -> dict:
    """A settings argument: a JSON object, or the path of a JSON/YAML file holding one."""
    text = text.strip()
    if not text.startswith("{"):
        path = Path(text)
        if not path.is_file():
            raise cli.PipelineError(f"--settings {text!r} is neither a JSON object nor a settings file")
        import yaml

        loaded = yaml.safe_load(path.read_text())
    else:
        try:
            loaded = json.loads(text)
        except json.JSONDecodeError as err:
            raise cli.PipelineError(f"--settings is not valid JSON ({err}): {text[:200]}") from None
    if not isinstance(loaded, dict):
        raise cli.PipelineError(f"--settings must be a JSON object of settings, got {type(loaded).__name__}")
    return loaded


def lookup(config: Mapping[str, Any], section: str) -> Any:
    """The value of a dotted section of a (validated) config; None where a key is absent."""
    value: Any = config
    for key in section.split("."):
        value = value.get(key) if isinstance(value, Mapping) else None
    return value


def job_json(config: Mapping[str, Any], *sections: str, omit: Sequence[str] = (), only: Sequence[str] = ()) -> str:
    """The settings a job's command uses, as the one JSON string a rule passes (``params``): a change in
    any of these sections, and only in them, re-runs the job. ``omit``: keys of a section (dotted) that are
    paths or switches of other rules, left out so that changing them re-runs nothing; ``only``: the keys of
    a section (dotted) to keep, the others left out."""
    picked = {section: copy.deepcopy(lookup(config, section)) for section in sections}

    def section_of(dotted: str) -> str:
        return next(s for s in sections if dotted.startswith(s + "."))

    for dotted in omit:
        picked[section_of(dotted)].pop(dotted[len(section_of(dotted)) + 1:], None)
    kept: dict[str, set] = {}
    for dotted in only:
        kept.setdefault(section_of(dotted), set()).add(dotted[len(section_of(dotted)) + 1:])
    for section, keys in kept.items():
        picked[section] = {k: v for k, v in picked[section].items() if k in keys}
    return json.dumps(picked, sort_keys=True)


def add_argument(parser: Any, *sections: str) -> None:
    """A command's --settings option: the config sections it reads, as one JSON object."""
    keys = ", ".join(f'"{section}"' for section in sections)
    parser.add_argument("--settings", default="{}", help=f"JSON object with the config sections {keys} as keys (or a "
                        "JSON/YAML file holding one); keys left out take schemas/config.schema.yaml's defaults")


def read_job(text: str, *sections: str) -> tuple[Any, ...]:
    """A command's --settings (``job_json``, or by hand only the keys to change) as one checked Settings per
    section, in the order asked; a section given as null that has no default stays None (an optional one).
    A settings file (``--settings config.yaml``) may be a whole config: the command takes its sections."""
    given = load_json(text)
    from_file = not text.strip().startswith("{")
    unknown = sorted(set(given) - set(sections))
    if unknown and not from_file:
        raise cli.PipelineError(f"--settings has sections {unknown} this command does not use; it reads "
                                f"{', '.join(sections)}")
    resolved = []
    for section in sections:
        value = given[section] if section in given else lookup(given, section)
        node = section_schema(section)
        if value is None and "default" not in node and node.get("type") != "object":
            resolved.append(None)
            continue
        resolved.append(resolve(section, value))
    return tuple(resolved)
