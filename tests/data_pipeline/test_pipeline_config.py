"""Pipeline configuration: YAML files, flag overrides, Beam options, --help."""

from pathlib import Path

import pytest

from data_pipeline.build import make_parser, parse_args
from data_pipeline.config import SAMPLE_DATA, PipelineConfig, SourceConfig, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "data"


def test_sample_yaml_is_the_embedded_default():
    assert load_config(str(CONFIGS / "sample.yaml")) == PipelineConfig()
    assert parse_args([])[0] == PipelineConfig()


def test_agenttuning_yaml_is_the_papers_recipe(monkeypatch):
    monkeypatch.setenv("SHAREGPT_GPT4", "gs://b/gpt4.json")
    monkeypatch.setenv("SHAREGPT_GPT35", "gs://b/gpt35.json")
    cfg = load_config(str(CONFIGS / "agenttuning.yaml"))
    assert cfg.agent == (SourceConfig("THUDM/AgentInstruct", "agentinstruct", "hf"),)
    assert [s.path for s in cfg.general] == ["gs://b/gpt4.json", "gs://b/gpt35.json"]
    assert (cfg.eta, cfg.general_weights, cfg.max_seq_len) == (0.2, (0.2, 0.8), 4096)
    assert cfg.reward_threshold("mind2web") == pytest.approx(2 / 3) and cfg.reward_threshold("os") == 1.0
    assert cfg.tokenizer == "meta-llama/Llama-2-7b-chat-hf"


def test_flags_override_the_config_file():
    cfg, beam_args, _ = parse_args([
        "--config", str(CONFIGS / "sample.yaml"), "--agent", "a=x.jsonl", "--agent", "THUDM/AgentInstruct:os",
        "--general", "g=gs://bucket/sharegpt.json", "--eta", "0.3", "--max-seq-len", "2048", "--seed", "7",
        "--validation-fraction", "0.1", "--num-shards", "8", "--num-validation-shards", "2", "--output", "gs://b/out",
        "--system-prompt", "Be brief.", "--reward-threshold", "webshop=0.5", "--tokenizer", "${SAMPLE_DATA}/tiny_tokenizer"])
    assert cfg.agent == (SourceConfig("x.jsonl", "a"), SourceConfig("THUDM/AgentInstruct", "THUDM_AgentInstruct", "hf", ("os",)))
    assert cfg.general == (SourceConfig("gs://bucket/sharegpt.json", "g"),)
    assert cfg.general_weights == ()  # the file's two weights were for its two general sources
    assert (cfg.eta, cfg.max_seq_len, cfg.seed, cfg.validation_fraction) == (0.3, 2048, 7, 0.1)
    assert (cfg.num_shards, cfg.num_validation_shards, cfg.output, cfg.system_prompt) == (8, 2, "gs://b/out", "Be brief.")
    assert cfg.reward_thresholds == {"default": 1.0, "mind2web": pytest.approx(2 / 3), "webshop": 0.5}
    assert cfg.tokenizer == f"{SAMPLE_DATA}/tiny_tokenizer"
    assert beam_args == ["--runner=DirectRunner", "--direct_num_workers=2", "--direct_running_mode=in_memory"]


def test_beam_options_pass_through():
    _, beam_args, _ = parse_args(["--runner", "DataflowRunner", "--project", "p", "--region", "us-central1",
                                  "--temp_location", "gs://b/tmp", "--experiments=use_runner_v2",
                                  "--general-weights", "0.5,0.5"])
    assert beam_args == ["--runner=DataflowRunner", "--project=p", "--region=us-central1",
                         "--temp_location=gs://b/tmp", "--experiments=use_runner_v2"]
    _, local, _ = parse_args(["--direct_num_workers", "4"])
    assert "--direct_num_workers=4" in local


def test_help_documents_every_option():
    text = make_parser().format_help()
    for option in ("--agent", "--general", "--general-weights", "--tokenizer", "--eta", "--max-seq-len",
                   "--validation-fraction", "--num-shards", "--num-validation-shards", "--seed", "--output",
                   "--config", "--system-prompt", "--reward-threshold", "--runner", "--direct_num_workers",
                   "--direct_running_mode", "--project", "--region", "--temp_location"):
        assert option in text, option


@pytest.mark.parametrize("argv,message", [
    (["--eta", "1.5"], "eta must be in"), (["--general-weights", "1"], "general-weights has 1 values"),
    (["--general-weights=-1,2"], "general weights must be"), (["--num-shards", "0"], "must be >= 1"),
    (["--agent", "a=x.jsonl", "--general", "a=y.jsonl"], "source names must be unique"),
])
def test_bad_options_are_clear_errors(argv, message, capsys):
    with pytest.raises(SystemExit):
        parse_args(argv)
    assert message in capsys.readouterr().err


def test_unknown_yaml_keys_are_errors(tmp_path):
    (tmp_path / "c.yaml").write_text("eta: 0.2\netta: 0.3\n")
    with pytest.raises(ValueError, match="unknown pipeline config keys.*etta"):
        load_config(str(tmp_path / "c.yaml"))


def test_the_default_system_prompt_depends_on_the_template():
    """The paper's prompt for Llama 2; none for a Jinja template, whose own default then applies (as when a
    client sends no system message to a server); an explicit one (or "" for none) for either."""
    from data_pipeline.formats.chat_template import DEFAULT_SYSTEM_PROMPT

    assert PipelineConfig().effective_system_prompt == DEFAULT_SYSTEM_PROMPT
    assert PipelineConfig(chat_template="hf").effective_system_prompt is None
    assert PipelineConfig(chat_template="hf", system_prompt="Be brief.").effective_system_prompt == "Be brief."
    assert PipelineConfig(system_prompt="").effective_system_prompt is None
