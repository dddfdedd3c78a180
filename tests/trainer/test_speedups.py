"""What makes the default training faster changes nothing it computes: the loss at labelled
positions only equals the full loss with the same gradients (every adapter method, padded and
packed batches, accumulation), the frozen base held in bf16 computes what autocast computed and
is restored as loaded, and a default run learns what a run without them learns."""

from __future__ import annotations

import logging

import pytest
import torch

from pipeline.adapters.registry import ADAPTERS
from pipeline.config.options import load_option
from pipeline.data.packing import IGNORE_INDEX, collator
from pipeline.data.splits import build_datasets
from pipeline.model import loading
from pipeline.model.precision import FrozenBase, cpu_has_native_bf16
from pipeline.trainer import opening
from pipeline.trainer.loss import labelled_loss, output_layer, unsupported
from tests.conftest import read_json, run_train, write_jsonl
from tests.data.test_data import data_cfg

TRAINING_METHODS = sorted(name for name, settings in ADAPTERS.items() if settings.trains)


@pytest.fixture(scope="module")
def features(tokenizer, tmp_path_factory):
    records = [{"prompt": "question " * n, "completion": "answer " * (1 + n % 4)} for n in (3, 11, 6, 20, 8, 2)]
    path = write_jsonl(tmp_path_factory.mktemp("speedups") / "d.jsonl", records)
    rows = build_datasets(data_cfg(path), tokenizer).train
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def adapted(method: str, tiny_folder: str, **settings_given):
    settings = ADAPTERS[method](**settings_given)
    model_cfg = load_option("model", "tiny_llama")
    torch.manual_seed(0)
    model = loading.load_model(tiny_folder, model_cfg, settings.quantization())
    model = settings.apply(model, loading.describe(tiny_folder, model_cfg))
    with torch.no_grad():  # adapters start as an identity; move them so their gradients mean something
        for name, param in model.named_parameters():
            if param.requires_grad and param.is_floating_point() and method != "full":
                param.add_(0.05 * torch.randn_like(param))
    return model.train()


def loss_and_grads(model, batch, num_items, labelled: bool, opening_length: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same dropout masks in both computations
    if labelled:
        loss = labelled_loss(model, batch, num_items, opening=opening_length)
    else:
        loss = model(**batch, num_items_in_batch=num_items).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("method", TRAINING_METHODS)
@pytest.mark.parametrize("packing", [False, True], ids=["padded", "packed"])
def test_labelled_loss_and_gradients_equal_the_full_computation(method, packing, tiny_folder, tokenizer,
                                                               features):
    model = adapted(method, tiny_folder)
    assert unsupported(model) == ""
    batch = collator(tokenizer, packing, 128)(features)
    if method == "qlora":
        batch = {k: v.to(model.device) for k, v in batch.items()}
    # num_items_in_batch as the Trainer passes it under accumulation: the labelled tokens of all
    # micro-batches (here twice this one's), and None for a plain mean.
    counted = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    for num_items in (None, torch.tensor(2 * counted)):
        full, full_grads = loss_and_grads(model, batch, num_items, labelled=False)
        kept, kept_grads = loss_and_grads(model, batch, num_items, labelled=True)
        assert kept.item() == pytest.approx(full.item(), rel=1e-5)
        assert kept_grads.keys() == full_grads.keys() and full_grads
        for name, grad in full_grads.items():
            torch.testing.assert_close(kept_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_labelled_loss_refuses_a_model_that_calls_its_output_layer_otherwise(tiny_folder, tokenizer, features):
    model = adapted("lora", tiny_folder)
    batch = collator(tokenizer, False)(features)
    head = model.get_output_embeddings()
    # a head called a second time, on hidden states it was not given for the loss
    twice = head.register_forward_hook(lambda module, args, output: (module(*args), output)[1])
    try:
        with pytest.raises(RuntimeError, match="trainer.labelled_logits=false"):
            labelled_loss(model, batch, None)
    finally:
        twice.remove()


@pytest.mark.parametrize("tied", [True, False])
def test_frozen_base_in_bf16_computes_what_autocast_computed_and_is_restored(tied, tiny_folder, tokenizer,
                                                                              features, tmp_path):
    model = adapted("lora", tiny_folder)
    if not tied:
        model.get_output_embeddings().weight = torch.nn.Parameter(
            model.get_input_embeddings().weight.detach().clone(), requires_grad=False)
    loaded = {n: p.detach().clone() for n, p in model.named_parameters()}
    batch = collator(tokenizer, False)(features)
    with torch.autocast("cpu", torch.bfloat16):
        before, before_grads = loss_and_grads(model, batch, None, labelled=True)
    frozen = FrozenBase(model, torch.bfloat16, tmp_path / "scratch.pt")
    cast = frozen.cast()
    assert cast > 0 and (tmp_path / "scratch.pt").exists()
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert all(dtypes[n] == torch.float32 for n, p in model.named_parameters() if p.requires_grad)
    assert dtypes["base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight"] == torch.bfloat16
    assert dtypes["base_model.model.model.norm.weight"] == torch.float32
    with torch.autocast("cpu", torch.bfloat16):
        after, after_grads = loss_and_grads(model, batch, None, labelled=True)
    # Each matmul multiplies the weights autocast rounded before; tied, the input embeddings are
    # rounded as well (the residual stream stays fp32).
    tolerance = dict(rel=2e-2) if tied else dict(rel=1e-6)
    assert after.item() == pytest.approx(before.item(), **tolerance)
    if not tied:
        for name, grad in before_grads.items():
            torch.testing.assert_close(after_grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    # Outside autocast (generation during training) the cast layers still run, in bf16.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"][:1]).logits
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    frozen.restore()
    assert not (tmp_path / "scratch.pt").exists()
    for name, param in model.named_parameters():
        assert param.dtype == loaded[name].dtype and torch.equal(param.detach(), loaded[name]), name
    assert not model.get_input_embeddings()._forward_hooks


@pytest.mark.parametrize("method", TRAINING_METHODS)
def test_frozen_base_keeps_every_trainable_weight_in_fp32(method, tiny_folder, tokenizer, features, tmp_path):
    model = adapted(method, tiny_folder)
    frozen = FrozenBase(model, torch.bfloat16, tmp_path / "scratch.pt")
    cast = frozen.cast()
    try:
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
        if method == "full":
            assert cast == 0  # nothing is frozen
        elif method != "qlora":  # (a 4-bit base is never cast: the Trainer leaves it alone)
            assert cast > 0
        batch = collator(tokenizer, False)(features)
        if method == "qlora":
            batch = {k: v.to(model.device) for k, v in batch.items()}
        with torch.autocast("cpu", torch.bfloat16):
            loss = labelled_loss(model, batch, None)
        loss.backward()
        assert torch.isfinite(loss)
        assert all(p.grad is not None and p.grad.dtype == torch.float32
                   for p in model.parameters() if p.requires_grad)
    finally:
        frozen.restore()


def eval_losses(runs, tmp_path):
    """Each named run's tuned eval loss (and the metrics of each), trained into ``tmp_path``."""
    metrics = {}
    for name, overrides in runs.items():
        folder = tmp_path / name.replace(" ", "_")
        run_train(overrides, folder)
        metrics[name] = read_json(folder / "metrics.json")
    return {name: m["tuned/eval/loss"] for name, m in metrics.items()}, metrics


def assert_within_seed_spread(losses, changed, plain):
    """``changed`` ends at ``plain``'s eval loss within what a change of seed ("other seed") moves it."""
    spread = abs(losses["other seed"] - losses[plain])
    assert abs(losses[changed] - losses[plain]) <= max(spread, 1e-3), losses


def test_default_speedups_learn_what_the_plain_loop_learns(tmp_path, caplog):
    """The same steps with the defaults and with every speed-up off: the same eval loss, within
    what a change of seed moves it."""
    common = ["model=tiny_llama", "debug=fast", "trainer.max_steps=6", "trainer.eval_steps=null",
              "trainer.save_steps=null", "evaluation.metrics=[]", "evaluation.splits=[eval]",
              "trainer.learning_rate=5e-3"]
    plain = ["trainer.labelled_logits=false", "trainer.base_in_compute_dtype=false", "trainer.shared_opening=false"]
    runs = {"default": common, "plain": common + plain, "other seed": common + plain + ["seed=7"]}
    caplog.set_level(logging.INFO, logger="pipeline.trainer.build")
    losses, metrics = eval_losses(runs, tmp_path)
    assert losses["default"] < metrics["default"]["base/eval/loss"]  # it learned
    assert_within_seed_spread(losses, "default", "plain")
    if cpu_has_native_bf16():  # (the log's first run is the default one)
        assert sum("frozen base:" in r.getMessage() for r in caplog.records) == 1


def test_packing_is_kept_where_the_attention_honours_the_boundaries(tiny_folder, caplog):
    from pipeline.trainer.build import packing_for

    model = adapted("lora", tiny_folder)
    caplog.set_level(logging.INFO, logger="pipeline.trainer.build")
    assert packing_for(True, model) is True and model.training
    assert "attention honours the boundaries" in caplog.text
    assert packing_for(False, model) is False


def test_packing_is_turned_off_where_packed_examples_would_see_each_other(tiny_folder, caplog):
    from pipeline.trainer.build import packing_for

    model = adapted("lora", tiny_folder)
    forward = model.forward

    def full_attention(**kwargs):  # an attention that ignores the restarting position ids
        kwargs["attention_mask"] = torch.ones_like(kwargs["input_ids"])
        return forward(**kwargs)

    model.forward = full_attention
    caplog.set_level(logging.INFO, logger="pipeline.trainer.build")
    assert packing_for(True, model) is False
    assert "padded batches instead of packed ones" in caplog.text and "attend to each other" in caplog.text


def test_compile_maps_onto_training_arguments_and_auto_says_why(tmp_path, caplog):
    from pipeline.commands import validation
    from pipeline.commands.compose import typed_config
    from tests.conftest import compose_train

    caplog.set_level(logging.INFO, logger="pipeline.trainer.build")
    from pipeline.trainer.build import training_arguments

    for value, expected in (("on", True), ("off", False), ("auto", False)):
        cfg = typed_config(compose_train(["model=tiny_llama", f"trainer.compile={value}"], tmp_path))
        args = training_arguments(cfg.trainer, tmp_path, 0, has_eval=False, report_to=[], run_name="x")
        assert args.torch_compile is expected
    assert "torch.compile: off (trainer.compile=auto:" in caplog.text
    cfg = typed_config(compose_train(["model=tiny_llama", "+trainer.extra.torch_compile=true"], tmp_path))
    assert any("use trainer.compile=on" in p for p in validation._check_trainer(cfg.trainer))


def test_memory_estimate_counts_the_frozen_base_in_bf16_under_bf16_autocast(tmp_path, monkeypatch):
    from pipeline.commands.compose import typed_config
    from pipeline.trainer import memory
    from tests.conftest import compose_train

    def estimate(*overrides):
        cfg = typed_config(compose_train(["model=tiny_llama", *overrides], tmp_path))
        counts = memory.count_for_config(cfg)
        return counts, memory.for_config(cfg, counts)

    counts, bf16 = estimate("trainer.precision=bf16")
    _, off = estimate("trainer.precision=bf16", "trainer.base_in_compute_dtype=false")
    _, fp32 = estimate("trainer.precision=fp32")
    # the tied output layer is a matmul weight too: every frozen weight but the norms
    assert 0 < counts.frozen_matmul < counts.total - counts.trainable
    assert off.weights == fp32.weights == 4 * counts.total
    assert bf16.weights == off.weights - 2 * counts.frozen_matmul
    assert bf16.optimizer == off.optimizer and bf16.gradients == off.gradients  # trainable stay fp32
    full_counts, full = estimate("trainer.precision=bf16", "adapter=full")
    assert full.weights == 4 * full_counts.total  # nothing frozen


INSTRUCTION = "Classify the sentiment of this product review as positive or negative, in one word. "


@pytest.fixture(scope="module")
def opened(tokenizer, tmp_path_factory):
    """Examples that share a long opening (the template's and an instruction), one-word answers."""
    records = [{"prompt": INSTRUCTION + "the screen is " + "very " * n + "bright", "completion": word}
               for n, word in ((3, "positive"), (9, "negative"), (5, "positive"), (1, "negative"))]
    path = write_jsonl(tmp_path_factory.mktemp("opening") / "d.jsonl", records)
    rows = build_datasets(data_cfg(path), tokenizer).train
    return [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows]


def one_per_row(tokenizer, features, packed: bool):
    """A padded batch, or packed rows of one example each (a trailing padding segment)."""
    if not packed:
        return collator(tokenizer, False)(features)
    width = -(-max(len(f["input_ids"]) for f in features) // 8) * 8
    batch = collator(tokenizer, True, width)(features)
    assert len(batch["input_ids"]) == len(features)  # one example a row
    return batch


@pytest.mark.parametrize("method", TRAINING_METHODS)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_shared_opening_gives_the_loss_and_gradients_of_whole_rows(method, packed, tiny_folder, tokenizer, opened):
    # no dropout (the opening's masks would be shared); QLoRA computing in fp32, where it is exact
    model = adapted(method, tiny_folder, **({"compute_dtype": "float32"} if method == "qlora" else {})).eval()
    batch = one_per_row(tokenizer, opened, packed)
    if method == "qlora":
        batch = {k: v.to(model.device) for k, v in batch.items()}
    length = opening.shared_length(batch)
    assert length >= opening.MINIMUM
    assert opening.cache_problem(model, output_layer(model)) == ""
    for num_items in (None, torch.tensor(7)):
        whole, whole_grads = loss_and_grads(model, batch, num_items, labelled=True)
        once, once_grads = loss_and_grads(model, batch, num_items, labelled=True, opening_length=length)
        assert once.item() == pytest.approx(whole.item(), rel=1e-5)
        assert once_grads.keys() == whole_grads.keys() and whole_grads
        for name, grad in whole_grads.items():
            torch.testing.assert_close(once_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_shared_length_stops_where_rows_differ_or_labels_start(tokenizer, opened, features):
    batch = collator(tokenizer, False)(opened)
    ids, labels = batch["input_ids"], batch["labels"]
    length = opening.shared_length(batch)
    assert bool((ids[:, :length] == ids[:1, :length]).all())
    assert not bool((ids[:, length + 1] == ids[0, length + 1]).all()) or \
        bool((labels[:, length + 1] != IGNORE_INDEX).any())  # it stopped for a reason
    early = dict(batch, labels=labels.clone())
    early["labels"][0, 10] = 5  # a label inside the opening: the opening ends before it
    assert opening.shared_length(early) == 0  # 9 tokens: too few to share
    assert opening.shared_length({k: v[:1] for k, v in batch.items()}) == 0  # one row: nothing to share
    left = dict(batch, attention_mask=batch["attention_mask"].flip(1))  # left padding
    assert opening.shared_length(left) == 0
    # packed rows of several examples: a cache would let them attend to each other
    several = collator(tokenizer, True, 512)(opened + features)
    assert opening.shared_length(several) == 0
    assert opening.shared_length(one_per_row(tokenizer, opened, True)) == length


def test_shared_opening_is_off_where_the_cache_cannot_stand_for_the_opening(tiny_folder, caplog):
    model = adapted("lora", tiny_folder)
    forward = model.forward

    def forgetful(**kwargs):  # a model that ignores the cache it is given
        kwargs.pop("cache", None), kwargs.pop("past_key_values", None)
        return forward(**kwargs)

    model.forward = forgetful
    assert "differ" in opening.cache_problem(model, output_layer(model))


def test_a_run_computes_the_shared_opening_once_and_learns_the_same(tmp_path, caplog):
    """Training on examples with a common opening: the log names the shared tokens, and the eval
    loss equals the run without sharing within what a change of seed moves it."""
    records = [{"prompt": INSTRUCTION + f"review {i}: the {'screen' if i % 2 else 'case'} is "
                + ("great " if i % 3 else "awful ") * (1 + i % 5), "completion": "positive" if i % 3 else "negative"}
               for i in range(60)]
    path = write_jsonl(tmp_path / "reviews.jsonl", records)
    common = ["model=tiny_llama", "debug=fast", "data=my_jsonl", f"data.path={path}", "data.packing=false",
              "trainer.max_steps=6", "trainer.eval_steps=null", "trainer.save_steps=null",
              "evaluation.metrics=[]", "evaluation.splits=[eval]", "trainer.learning_rate=5e-3"]
    runs = {"shared": common, "whole": common + ["trainer.shared_opening=false"],
            "other seed": common + ["trainer.shared_opening=false", "seed=7"]}
    caplog.set_level(logging.INFO, logger="pipeline.trainer.build")
    losses, _ = eval_losses(runs, tmp_path)
    # the first run alone shares an opening; the log says so once
    assert sum("run once (the first batch" in r.getMessage() for r in caplog.records) == 1, caplog.text
    assert_within_seed_spread(losses, "shared", "whole")
    assert "trainer.shared_opening has no effect" not in caplog.text


def test_rotary_scalings_that_depend_on_a_calls_length_keep_rows_whole():
    from transformers import LlamaConfig, Phi3Config

    assert opening.rope_problem(LlamaConfig()) == ""
    assert opening.rope_problem(LlamaConfig(rope_scaling={"rope_type": "linear", "factor": 2.0})) == ""
    assert "dynamic" in opening.rope_problem(LlamaConfig(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    long = Phi3Config(hidden_size=64, num_attention_heads=2, max_position_embeddings=64,
                      original_max_position_embeddings=32,
                      rope_scaling={"type": "longrope", "short_factor": [1.0] * 16, "long_factor": [2.0] * 16})
    assert "longrope" in opening.rope_problem(long)


def test_gradient_checkpointing_keeps_rows_whole(tmp_path, caplog):
    """The model drops its cache while it recomputes layers: the run trains on whole rows."""
    records = [{"prompt": INSTRUCTION + f"review {i}: " + "fine " * (1 + i % 4), "completion": "positive"}
               for i in range(24)]
    path = write_jsonl(tmp_path / "reviews.jsonl", records)
    caplog.set_level(logging.INFO, logger="pipeline.trainer.build")
    run_train(["model=tiny_llama", "debug=fast", "data=my_jsonl", f"data.path={path}", "data.packing=false",
               "model.gradient_checkpointing=true", "trainer.max_steps=2", "trainer.eval_steps=null",
               "trainer.save_steps=null", "evaluation.metrics=[]", "evaluation.splits=[eval]"], tmp_path / "run")
    assert "trainer.shared_opening has no effect): gradient checkpointing" in caplog.text
    assert "run once (the first batch" not in caplog.text
    assert read_json(tmp_path / "run" / "metrics.json")["tuned/eval/loss"] > 0
