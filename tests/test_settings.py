"""Each job's settings: one object, defaults only from the schema, checked once, frozen."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from conftest import REPO
from workflow_scripts.common import cli, settings
from workflow_scripts.learning.recipe import training_settings

SCHEMA = yaml.safe_load((REPO / "schemas" / "config.schema.yaml").read_text())


def test_an_empty_object_takes_every_default_from_the_schema():
    n4 = settings.resolve("preprocess.n4")
    declared = SCHEMA["properties"]["preprocess"]["properties"]["n4"]["properties"]
    assert n4.plain() == {key: sub["default"] for key, sub in declared.items()}
    train = settings.resolve("train", {"lr_head": 0.5})
    assert train.lr_head == 0.5 and train.augmentation.gamma_p == 0.3 and train.wandb.mode == "offline"


def test_an_error_names_the_key_and_the_value():
    with pytest.raises(cli.PipelineError, match=r'train\.lr_head = "fast": .fast. is not of type .number.'):
        settings.resolve("train", {"lr_head": "fast"})
    with pytest.raises(cli.PipelineError, match=r"train\.augmentation = .*'gama_p' was unexpected"):
        settings.resolve("train", {"augmentation": {"gama_p": 1}})
    with pytest.raises(cli.PipelineError, match=r'experiments\.big\.arch = "r4d"'):
        training_settings({}, {"arch": "r4d"}, "big")


def test_settings_are_frozen_and_read_by_attribute_or_key():
    n4 = settings.resolve("preprocess.n4")
    assert n4.shrink_factor == n4["shrink_factor"] and n4.iterations == (50, 50, 50, 50)
    with pytest.raises(AttributeError, match="frozen"):
        n4.shrink_factor = 2
    with pytest.raises(AttributeError, match="no key 'shrink'"):
        n4.shrink  # noqa: B018
    assert json.loads(json.dumps(n4.plain())) == n4.plain()


def test_a_job_receives_only_its_sections_and_a_change_elsewhere_leaves_its_settings_alone():
    config = yaml.safe_load((REPO / "config.yaml").read_text())
    before = settings.job_json(config, "segmentation", omit=("segmentation.in_all", "segmentation.msd_root"))
    config["segmentation"]["in_all"] = not config["segmentation"]["in_all"]
    config["preprocess"]["n4"]["shrink_factor"] = 2
    assert settings.job_json(config, "segmentation", omit=("segmentation.in_all", "segmentation.msd_root")) == before
    config["segmentation"]["lr"] = 0.5
    assert settings.job_json(config, "segmentation", omit=("segmentation.in_all", "segmentation.msd_root")) != before
    assert "in_all" not in json.loads(before)["segmentation"]


def test_read_job_refuses_a_section_the_command_does_not_use():
    with pytest.raises(cli.PipelineError, match=r"sections \['train'\] this command does not use; it reads preprocess.n4"):
        settings.read_job('{"train": {}}', "preprocess.n4")
    assert settings.read_job("{}", "qc.thresholds.brain_volume_ml") == (None,)  # an optional bound stays unset


def test_an_experiment_override_wins_over_train_and_the_rest_is_the_schema_default():
    job = training_settings({"max_epochs": 7}, {"weights": "none", "train": {"lr_head": 0.01}}, "x")
    assert job.train.max_epochs == 7 and job.train.lr_head == 0.01
    assert job.train.lr_backbone == SCHEMA["properties"]["train"]["properties"]["lr_backbone"]["default"]
    assert job.model.plain() == {"arch": "r3d_18", "weights": "none", "trainable_from": "layer4", "plane": "axial",
                                 "n_slices": 16, "slice_spacing": 2}


def test_the_training_command_stops_on_a_wrong_setting_naming_it(tmp_path):
    result = subprocess.run([sys.executable, "-m", "workflow_scripts.learning.train", "fit", "--out-dir",
                             str(tmp_path / "run"), "--settings", '{"train": {"batch_size": 0}}'],
                            cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert "train.batch_size = 0: 0 is less than the minimum of 1" in result.stderr
    assert not (tmp_path / "run").exists()


def schema_defaults() -> dict[str, list[tuple[str, object]]]:
    """Every scalar or list default of the schema, by its key name: [(dotted section, default)]."""
    found: dict[str, list[tuple[str, object]]] = {}

    def walk(node: dict, path: list[str]) -> None:
        for key, sub in (node.get("properties") or {}).items():
            if "default" in sub and not isinstance(sub["default"], dict):
                found.setdefault(key, []).append((".".join([*path, key]), sub["default"]))
            walk(sub, [*path, key])
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], [*path, "*"])

    walk(SCHEMA, [])
    return found


def comparable(value: object) -> object:
    """Tuples and lists, ints and floats compare equal; booleans stay booleans."""
    if isinstance(value, (list, tuple)):
        return tuple(comparable(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    return float(value)


def test_no_function_re_declares_a_default_of_the_schema():
    """The schema is the only place a setting's default is written: a library function whose parameter is
    named like a setting takes it from its caller, never from a second copy of the default."""
    import ast

    defaults = schema_defaults()
    modules = {path: ast.parse(path.read_text()) for path in sorted((REPO / "workflow_scripts").rglob("*.py"))}
    constants = {}  # module-level NAME = <literal>, as a default may name one (classes=DEFAULT_CLASSES)
    for tree in modules.values():
        for node in tree.body:
            if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
                try:
                    constants[node.targets[0].id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    copies = []
    for path, tree in modules.items():
        where = str(path.relative_to(REPO / "workflow_scripts"))
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            args = node.args
            positional = args.posonlyargs + args.args
            pairs = list(zip(positional[len(positional) - len(args.defaults):], args.defaults))
            pairs += [(a, d) for a, d in zip(args.kwonlyargs, args.kw_defaults) if d is not None]
            for arg, default in pairs:
                if arg.arg not in defaults:
                    continue
                try:
                    value = ast.literal_eval(default)
                except ValueError:
                    name = ast.unparse(default).rsplit(".", 1)[-1]
                    if name not in constants:
                        continue  # a call or a computed value: not a written copy
                    value = constants[name]
                same = [section for section, d in defaults[arg.arg] if value is not None
                        and comparable(d) == comparable(value)]
                if same:
                    copies.append(f"{where}:{node.lineno} {node.name}({arg.arg}={value!r}) copies {same}")
    assert copies == []
