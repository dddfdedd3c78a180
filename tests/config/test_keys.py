"""Keys no schema has are refused in every entry point's config, with the closest key there is;
only the maps a schema declares open take new keys (pipeline/commands/keys.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from hydra.errors import ConfigCompositionException

from pipeline.commands import store
from pipeline.commands.compose import compose_train, typed_config
from pipeline.config.errors import ConfigError
from tests.conftest import CONF, ROOT, python_path


def _compose(name, overrides):
    GlobalHydra.instance().clear()
    with initialize_config_dir(str(CONF), version_base="1.3"):
        return compose(name, overrides=["paths.run_dir=.", *overrides])


@pytest.mark.parametrize("overrides, message", [
    (["+trainer.learnig_rate=1e-4"], "trainer.learnig_rate=0.0001 is not a setting: did you mean trainer.learning_rate?"),
    (["+learnig_rate=1e-4"], "learnig_rate=0.0001 is not a setting: did you mean trainer.learning_rate?"),
    (["+foo=1"], "foo=1 is not a setting: remove it"),
    (["model=tiny_llama", "+model.tiny.hidden_sise=3"], "model.tiny.hidden_sise=3 is not a setting: did you mean "
                                                         "model.tiny.hidden_size?"),
    (["+evaluation.decoding.max_new_token=8"], "did you mean evaluation.decoding.max_new_tokens?"),
])
def test_train_refuses_an_added_key_the_schema_lacks(overrides, message):
    with pytest.raises(ConfigError) as err:
        compose_train(overrides)
    assert message in str(err.value)
    assert "new keys go only in" in str(err.value) and "trainer.extra" in str(err.value)


@pytest.mark.parametrize("override", ["+trainer.extra.warmup_steps=3", "+trainer.learning_rate_per_method.lora=1e-3",
                                      "+distributed.deepspeed_extra.wall_clock_breakdown=true",
                                      "+data.sharegpt_roles.bot=assistant"])
def test_open_maps_take_new_keys(override):
    compose_train([override])


def test_unknown_keys_and_other_problems_are_reported_together():
    with pytest.raises(ConfigError) as err:
        compose_train(["+trainer.learnig_rate=1e-4", "trainer.max_steps=-5", "+adapter.rr=4"])
    text = "\n".join(err.value.problems)
    assert "did you mean trainer.learning_rate" in text and "trainer.max_steps=-5" in text and "adapter.rr=4" in text


@pytest.mark.parametrize("name, overrides, message", [
    ("evaluate", ["run=x", "+evaluation.metrix=[bleu]"], "evaluation.metrix=['bleu'] is not a setting: did you mean "
                                                          "evaluation.metrics?"),
    ("serve", ["run=x", "+server.prot=9000"], "server.prot=9000 is not a setting: did you mean server.port?"),
    ("export", ["run=x", "+export.merg=true"], "export.merg=True is not a setting: did you mean export.merge?"),
    ("serve", ["run=x", "server.port=0"], "server.port=0 must be in 1..65535"),
    ("merge", ["runs=[a,b]", "+merge.densty=0.5"], "merge.densty=0.5 is not a setting: did you mean merge.density?"),
    ("merge", ["runs=[a,b]", "merge.density=1.5"], "merge.density=1.5 must be in (0, 1] or null"),
])
def test_every_entry_point_refuses_unknown_keys_and_out_of_range_values(name, overrides, message):
    if name != "evaluate":
        store.forget_sweeps()  # as these entry points do: their `sweep` is a key
    try:
        cfg = _compose(name, overrides)
    finally:
        store.register_configs()
    with pytest.raises(ConfigError) as err:
        typed_config(cfg)
    assert message in str(err.value)


def test_an_override_under_a_null_section_names_the_option_that_defines_it():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["debug=fast", "logger.wandb.project=x"])
    assert str(err.value) == ("Could not override 'logger.wandb.project': logger.wandb is null here (the logger "
                              "option in use, or an option such as debug=... that picks it, sets none); add "
                              "logger=wandb to the command line, or drop the override")
    assert compose_train(["debug=fast", "logger=wandb", "logger.wandb.project=x"]).logger.wandb.project == "x"


def test_a_misspelt_override_gets_the_closest_key_not_a_plus_hint():
    with pytest.raises(ConfigCompositionException) as err:
        compose_train(["trainer.learnig_rate=1e-4"])
    assert str(err.value) == "Could not override 'trainer.learnig_rate': not a setting; did you mean trainer.learning_rate?"


@pytest.mark.parametrize("module, args", [("pipeline.estimate", ["+trainer.learnig_rate=1e-4"]),
                                          ("pipeline.data", ["+trainer.learnig_rate=1e-4"])])
def test_tools_refuse_unknown_keys_in_one_line(module, args):
    done = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": python_path()}, timeout=300)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "did you mean trainer.learning_rate?" in done.stderr and "Traceback" not in done.stderr
