"""The configuration contract: schema validation, documented keys, environments agreeing with pyproject."""
from __future__ import annotations

import re
import tomllib

import jsonschema
import pytest
import yaml

from conftest import REPO, run_snakemake, write_config

SCHEMA = yaml.safe_load((REPO / "schemas/config.schema.yaml").read_text())
CONFIG = yaml.safe_load((REPO / "config.yaml").read_text())


def test_default_config_is_valid():
    jsonschema.validate(CONFIG, SCHEMA)


def test_quick_profile_reads_the_suites_settings_and_builds_the_report():
    """`snakemake --profile profiles/quick`: the settings file the suite's tiny run uses (no copy), valid
    over config.yaml, offline by construction (deepbet, random weights), and report.html after the run."""
    from conftest import QUICK_SETTINGS, TINY

    profile = yaml.safe_load((REPO / "profiles" / "quick" / "config.yaml").read_text())
    assert (REPO / "profiles" / "quick" / profile["configfile"]).resolve() == QUICK_SETTINGS.resolve()
    assert profile["report"] == "report.html" and profile["report-after-run"] is True
    settings = yaml.safe_load(QUICK_SETTINGS.read_text())
    assert settings == {**TINY, "demo": {k: v for k, v in TINY["demo"].items() if k != "faults"}}
    merged = {**CONFIG, **{k: ({**CONFIG[k], **v} if isinstance(v, dict) else v) for k, v in settings.items()}}
    jsonschema.validate(merged, SCHEMA)
    assert settings["preprocess"]["skullstrip"]["method"] == "deepbet"
    assert {e.get("weights", "none") for e in settings["experiments"].values()} == {"none"}


def _walk(schema, path=""):
    for key, sub in schema.get("properties", {}).items():
        yield f"{path}{key}", sub
        yield from _walk(sub, f"{path}{key}.")
    if isinstance(schema.get("additionalProperties"), dict):  # user-named entries, e.g. experiments.<name>
        yield f"{path}*", schema["additionalProperties"]
        yield from _walk(schema["additionalProperties"], f"{path}*.")


def test_every_schema_key_is_documented_and_every_config_key_is_in_the_schema():
    undocumented = [k for k, sub in _walk(SCHEMA)
                    if "description" not in sub and "$ref" not in sub and not k.endswith("*")]
    assert undocumented == []

    def keys(d, path=""):
        for k, v in d.items():
            k = "*" if path == "experiments." else k
            yield f"{path}{k}"
            if isinstance(v, dict) and not path.startswith("resources"):
                yield from keys(v, f"{path}{k}.")
    schema_keys = {k for k, _ in _walk(SCHEMA)}
    # an experiment's train block overrides `train` keys: each must be documented under train
    schema_keys |= {f"experiments.*.{k}" for k in schema_keys if k.startswith("train.")}
    assert [k for k in keys(CONFIG) if k not in schema_keys and not k.startswith("resources.")] == []


def test_dissertation_defaults_are_the_config_defaults():
    pre = CONFIG["preprocess"]
    assert pre["skullstrip"]["method"] == "synthstrip"
    assert pre["resample"] == {"spacing": [1.0, 1.0, 1.0], "interpolation": "bspline"}
    assert pre["crop"]["margin"] == 3 and pre["crop"]["zoom_order"] == 3
    assert pre["target_shape"] == [128, 128, 128]
    assert CONFIG["data"]["classes"] == ["AD", "CN"]


@pytest.mark.parametrize("override,named", [
    ({"preprocess": {"skullstrip": {"methd": "deepbet"}}}, "methd"),
    ({"preprocess": {"target_shape": "128"}}, "target_shape"),
    ({"data": {"source": "oasis"}}, "oasis"),
    ({"results_dirr": "x"}, "results_dirr"),
])
def test_a_wrong_key_or_type_stops_the_run_naming_the_key(tmp_path, override, named):
    cfg = write_config(tmp_path / "bad.yaml", override)
    result = run_snakemake(tmp_path, "-n", configfiles=[cfg], check=False, timeout=120)
    assert result.returncode != 0
    assert named in result.stderr + result.stdout


def _names(requirements):
    return {re.split(r"[<>=!~\[ ;]", r.strip(), maxsplit=1)[0].lower() for r in requirements}


def test_conda_environments_list_the_same_packages_as_pyproject():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    runner = {n for n in _names(project["dependencies"]) if n.startswith("snakemake")}
    job_packages = _names(project["dependencies"]) - runner
    env_packages = set()
    for env_file in sorted((REPO / "envs").glob("*.yaml")):
        env = yaml.safe_load(env_file.read_text())
        for dep in env["dependencies"]:
            if isinstance(dep, dict):
                env_packages |= _names(dep.get("pip", []))
    assert env_packages == job_packages


def _lock_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("refresh_lock", REPO / "envs" / "refresh_lock.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_conda_environment_is_pinned_to_the_lock_and_the_lock_meets_pyproject():
    from packaging.requirements import Requirement

    lock = _lock_module()
    pins = lock.read_lock()
    env = yaml.safe_load((REPO / "envs" / "pipeline.yaml").read_text())
    pip_entries = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    for entry in pip_entries:
        name, _, version = entry.partition("==")
        assert version == pins[lock.normalise(name)], f"envs/pipeline.yaml {entry}: the lock has " \
                                                      f"{pins.get(lock.normalise(name))}; run envs/refresh_lock.py"
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    for text in project["dependencies"] + project["optional-dependencies"]["test"]:
        requirement = Requirement(text)
        locked = pins.get(lock.normalise(requirement.name))
        assert locked is not None and requirement.specifier.contains(locked), f"{text}: lock has {locked}"
    # the pins survive a refresh unchanged, and an unpinned entry gets the lock's version
    text = (REPO / "envs" / "pipeline.yaml").read_text()
    assert lock.pin_environment(text, pins) == text
    assert lock.pin_environment("  - pip:\n      - torch  # the network\n", pins) == \
        f"  - pip:\n      - torch=={pins['torch']}  # the network\n"


def test_the_suite_runs_in_the_locked_environment_the_readme_installs():
    """The figures and this suite come from the lock: the README's set-up and .ci/run install with it."""
    from importlib.metadata import version

    pins = _lock_module().read_lock()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = _names(project["dependencies"] + project["optional-dependencies"]["test"])
    different = {n: (version(n), pins[n]) for n in sorted(names) if version(n) != pins[n]}
    assert not different, f"installed vs envs/requirements.lock: {different}; install with the README's set-up"
    setup = 'pip install -c envs/requirements.lock -e ".[test]"'
    assert setup in (REPO / "README.md").read_text() and setup in (REPO / ".ci" / "run").read_text()


def test_offline_profile_downloads_nothing_and_says_what_it_uses_instead(tmp_path):
    """profiles/offline: without the files, deepbet and random weights replace the downloads; with them
    in the caches, those copies are used; the log says which at each place."""
    import os

    def dry_run() -> str:
        result = run_snakemake(tmp_path, "--profile", str(REPO / "profiles" / "offline"), "-n", "all", timeout=300,
                               env={**os.environ, "TORCH_HOME": str(tmp_path / "torch")})
        return result.stdout + result.stderr

    kinetics = tmp_path / "torch" / "hub" / "checkpoints" / "r3d_18-b3b3357e.pth"
    synthstrip = tmp_path / "resources" / "weights" / "synthstrip.1.pt"
    log = dry_run()
    assert "skull stripping uses deepbet instead, whose weights ship in its wheel" in log
    assert f"r3d_18_kinetics400's kinetics400 weights would be downloaded (none at {kinetics})" in log
    training = "\n".join(line for line in log.splitlines() if "workflow_scripts.learning.train" in line and " fit " in line)
    assert "pretrained_weights" not in log and '"weights": "none"' in training and '"weights": "kinetics400"' not in training
    assert '"method": "deepbet"' in log  # the resolved settings every job receives

    for planted in (kinetics, synthstrip):  # where the downloads would have put them
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.write_bytes(b"planted")
    log = dry_run()
    assert "offline: SynthStrip weights are not downloaded; the copy at resources/weights/synthstrip.1.pt is used" \
        in log and '"method": "synthstrip"' in log
    assert f"torchvision's cached copy {kinetics} is used" in log
    training = "\n".join(line for line in log.splitlines() if "workflow_scripts.learning.train" in line and " fit " in line)
    assert re.search(r"pretrained_weights\s+1\b", log) and '"weights": "kinetics400"' in training  # from the cache
