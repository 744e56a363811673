"""The training config: the release's YAML fields, typed command-line overrides, clear errors."""
import pytest
import yaml

import train as train_script
from slideredit.training import ConfigError, load_config

RELEASE_STYLE = {  # the release's YAML field names (STLoRA-PPS on a face folder)
    "pretrained_model_name_or_path": "black-forest-labs/FLUX.1-Kontext-dev",
    "images_dataset_path": "data/faces",
    "training_single_edit_prompts": ["make the hair curly", "add a red hat"],
    "max_num_instructions_per_prompt": 3,
    "validation_prompts": ["make the hair curly and add a red hat"],
    "validation_lora_scales": [-1.5, 0, 1.5],
    "lora_rank": 16, "lora_dropout": 0.0, "learning_rate": 5e-5, "train_batch_size": 6,
    "gradient_accumulation_steps": 1, "max_train_steps": 2000, "checkpointing_steps": 500,
    "validation_steps": 100, "guidance_scale": 3.5, "max_grad_norm": 1.0, "seed": 42,
    "output_dir": "runs/stlora", "resume_from_checkpoint": None, "method": "stlora",
}


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "stlora.yaml"
    path.write_text(yaml.safe_dump(RELEASE_STYLE))
    return path


def test_reads_the_release_fields(config_file):
    config = load_config(config_file)
    assert config.images_dataset_path == "data/faces" and config.max_train_steps == 2000
    assert config.validation_lora_scales == [-1.5, 0.0, 1.5] and config.seed == 42
    assert config.sharding == "ddp"  # not a release field: several processes hold the whole model by default
    assert (config.adam_beta1, config.adam_beta2, config.adam_weight_decay, config.adam_epsilon) == (0.9, 0.999, 1e-4, 1e-8)


def test_yaml_exponent_without_a_dot_is_a_number(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("images_dataset_path: x\ntraining_single_edit_prompts: [a]\nlearning_rate: 1e-4\n")
    assert yaml.safe_load(path.read_text())["learning_rate"] == "1e-4"  # PyYAML reads it as a string ...
    assert load_config(path).learning_rate == 1e-4  # ... the config still gets a float


def test_unknown_fields_are_named_with_the_closest_known_one(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text(yaml.safe_dump({**RELEASE_STYLE, "learning_rat": 1e-4, "zzz": 1}))
    with pytest.raises(ConfigError, match=r"'learning_rat' \(did you mean 'learning_rate'\?\), 'zzz'"):
        load_config(path)


@pytest.mark.parametrize("change, message", [
    ({"lora_dropout": 0.1}, "lora_dropout must be 0"),
    ({"method": "lora"}, "method must be 'gstlora' or 'stlora'"),
    ({"dataset_name": "UCSC-VLAA/HQ-Edit"}, "exactly one of dataset_name"),
    ({"training_single_edit_prompts": []}, "needs training_single_edit_prompts"),
    ({"train_batch_size": 0}, "train_batch_size must be at least 1"),
    ({"resolution": 1000}, "multiple of 16"),
    ({"mixed_precision": "fp16"}, "mixed_precision must be 'no' or 'bf16'"),
    ({"max_train_steps": "many"}, "'max_train_steps' must be a number"),
    ({"lora_rank": 2.5}, "'lora_rank' must be a whole number"),
    ({"gradient_checkpointing": "maybe"}, "'gradient_checkpointing' must be true or false"),
    ({"seed": None}, "'seed' must not be empty"),
    ({"sharding": "fsd"}, r"sharding must be 'ddp' or 'fsdp', got 'fsd' \(did you mean 'fsdp'\?\)"),
    ({"sharding": "FSDP"}, r"got 'FSDP' \(did you mean 'fsdp'\?\)"),
    ({"sharding": "zero3"}, r"sharding must be 'ddp' or 'fsdp', got 'zero3'$"),
])
def test_bad_values_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**RELEASE_STYLE, **change})


def test_not_a_mapping_and_missing_file(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(path)
    with pytest.raises(FileNotFoundError, match="config file not found"):
        load_config(tmp_path / "missing.yaml")


def test_command_line_overrides_every_field_with_its_type(config_file):
    config = train_script.parse_config([
        "--config", str(config_file), "--learning_rate", "1e-4", "--max_train_steps", "10", "--method", "gstlora",
        "--validation_lora_scales", "-1", "0", "1", "--resume", "latest", "--offload", "--gradient_checkpointing",
        "false", "--cache_dir", "none", "--validation_prompts", "a", "b", "--sharding", "fsdp"])
    assert config.learning_rate == 1e-4 and config.max_train_steps == 10 and config.method == "gstlora"
    assert config.validation_lora_scales == [-1.0, 0.0, 1.0] and config.validation_prompts == ["a", "b"]
    assert config.resume_from_checkpoint == "latest" and config.offload is True
    assert config.gradient_checkpointing is False and config.cache_dir is None and config.sharding == "fsdp"
    assert config.seed == 42  # untouched fields keep the file's values


def test_unknown_command_line_option_is_rejected(config_file, capsys):
    with pytest.raises(SystemExit):
        train_script.parse_config(["--config", str(config_file), "--learning_rat", "1"])
    assert "unrecognized arguments: --learning_rat" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Numbers out of range fail when the config is read, before anything is loaded
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("yaml_value", [".nan", ".inf", "-.inf", "nan"])
def test_a_non_finite_learning_rate_in_yaml_is_a_config_error(tmp_path, yaml_value):
    path = tmp_path / "nan.yaml"
    path.write_text(yaml.safe_dump(RELEASE_STYLE) + f"learning_rate: {yaml_value}\n")
    assert path.read_text().count("learning_rate") == 2  # the last one wins in YAML: this is the value read
    with pytest.raises(ConfigError, match="'learning_rate' must be a finite number"):
        load_config(path)


@pytest.mark.parametrize("change, message", [
    ({"learning_rate": 0}, "learning_rate must be positive, got 0"),
    ({"learning_rate": -1e-4}, "learning_rate must be positive"),
    ({"max_grad_norm": float("nan")}, "'max_grad_norm' must be a finite number"),
    ({"max_grad_norm": 0}, "max_grad_norm must be positive"),
    ({"adam_epsilon": 0}, "adam_epsilon must be positive"),
    ({"adam_beta1": 1.0}, r"adam_beta1 must be in \[0, 1\)"),
    ({"adam_beta2": -0.1}, r"adam_beta2 must be in \[0, 1\)"),
    ({"adam_weight_decay": -1e-4}, "adam_weight_decay must be at least 0"),
    ({"guidance_scale": "inf"}, "'guidance_scale' must be a finite number"),
    ({"guidance_scale": -1}, "guidance_scale must be at least 0"),
    ({"validation_lora_scales": [-1, float("nan"), 1]}, r"'validation_lora_scales\[1\]' must be a finite number"),
    ({"seed": -1}, r"seed must be in \[0, 2\*\*32\)"),
    ({"seed": 2 ** 32}, r"seed must be in \[0, 2\*\*32\)"),
    ({"max_train_steps": 0}, "max_train_steps must be at least 1"),
    ({"max_train_steps": "1e400"}, "'max_train_steps' must be a whole number"),
    ({"checkpointing_steps": -5}, "checkpointing_steps must be at least 1"),
    ({"checkpoints_total_limit": 0}, "checkpoints_total_limit must be at least 1"),
])
def test_out_of_range_numbers_are_clear_errors(change, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, {**RELEASE_STYLE, **change})


def test_a_nan_learning_rate_fails_before_the_model_loads(config_file, monkeypatch):
    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded for a config that cannot train")

    monkeypatch.setattr("slideredit.pipelines.SliderEditFluxKontextPipeline.from_pretrained", must_not_load)
    with pytest.raises(ConfigError, match="'learning_rate' must be a finite number, got 'nan'"):
        train_script.main(["--config", str(config_file), "--learning_rate", "nan"])
