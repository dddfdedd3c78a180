"""vLLM (slow tier): an exported LoRA run, started with the exported ``vllm serve`` command,
answers greedy prompts as ``pipeline.serve`` does; ``server.engine=vllm`` serves the same models;
``evaluation.engine=vllm`` generates what the built-in path generates.

These tests need vLLM's environment (``python -m pipeline.vllm_engine install``); without it they
skip, except where ``PIPELINE_TEST_VLLM=1`` (CI), where its absence fails them.

Equality: both engines run the base in float32 and decode greedily, but with different kernels
(and vLLM's own batching), so a prompt may diverge where the two best next tokens are almost
tied. A differing answer passes only if, teacher-forced on vLLM's tokens, the reference model's
first disagreement with vLLM is a near-tie: its top logit exceeds the logit of vLLM's token by
less than ``NEAR_TIE`` (then the rest may differ freely: the contexts differ from there on).
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import openai
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from pipeline import export
from pipeline.adapters.saved import load_adapter, read_run
from pipeline.config.schema import DecodingConfig
from pipeline.evaluate import evaluate
from pipeline.model import loading
from pipeline.scoring import vllm_client
from pipeline.scoring.generation import generate
from pipeline.serve import build_app
from tests.conftest import CONF, ROOT, read_json, run_train
from tests.server.test_serve import compose_serve, free_port, start_server
from tests.test_export import compose_export

pytestmark = pytest.mark.slow

NEAR_TIE = 0.05  # logits; float32 kernels differ by about 1e-3 here (see test output)
MAX_TOKENS = 24
CHATS = ["Translate to French: The file could not be saved.",
         "Translate to French: Please enter a valid email address.",
         "Translate to French: This field is required.",
         "Translate to French: Your password was changed.",
         "What is the capital of France?",
         "Write one sentence about the sea.",
         "Translate to French: Delete the selected objects?",
         "Translate to French: The page you requested was not found."]
COMPLETIONS = ["The capital of France is", "Bonjour, je m'appelle", "def add(a, b):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def vllm_python() -> str:
    try:
        return vllm_client.python()
    except vllm_client.VllmError as err:
        if os.environ.get("PIPELINE_TEST_VLLM") == "1":
            pytest.fail(f"PIPELINE_TEST_VLLM=1 but {err}")
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def lora_run(vllm_python, tmp_path_factory) -> Path:
    """The default model (SmolLM2-135M-Instruct) with a LoRA adapter trained for a few steps."""
    run_dir = tmp_path_factory.mktemp("vllm") / "run"
    run_train(["trainer.max_steps=16", "trainer.learning_rate=1e-3", "trainer.save_steps=null",
               "data.validation_size=16", "data.test_size=8", "logger=none", "evaluation.metrics=[]"],
               run_dir)
    assert read_json(run_dir / "run.json")["status"] == "success"
    return run_dir


def start_vllm(args: List[str], log: Path, env: Optional[dict] = None) -> tuple[subprocess.Popen, str]:
    """``vllm serve <args>`` on a free port; returns the process and its base URL once it answers."""
    port = free_port()
    proc = subprocess.Popen(vllm_client.worker_command("serve", *args, "--host", "127.0.0.1",
                                                       "--port", str(port)),
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    wait_until_up(proc, url, log)
    return proc, url


def wait_until_up(proc: subprocess.Popen, url: str, log: Path, api_key: str = "none") -> None:
    client = openai.OpenAI(base_url=url, api_key=api_key, max_retries=0, timeout=5)
    deadline = time.time() + 300
    while True:
        assert proc.poll() is None, f"vLLM exited ({proc.returncode}):\n{log.read_text()[-4000:]}"
        assert time.time() < deadline, f"vLLM did not start in 300 s:\n{log.read_text()[-4000:]}"
        try:
            client.models.list()
            return
        except openai.APIConnectionError:
            time.sleep(2)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


@dataclass
class Answer:
    text: str
    prompt_ids: List[int]
    ids: List[int]


def ask(client: openai.OpenAI, model: str, prompt: str, chat: bool, token_ids: bool) -> Answer:
    """One greedy answer; vLLM also returns the token ids (``return_token_ids``)."""
    extra = {"return_token_ids": True} if token_ids else None
    if chat:
        r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           temperature=0, max_tokens=MAX_TOKENS, extra_body=extra)
        choice, text = r.choices[0], r.choices[0].message.content
        prompt_ids = getattr(r, "prompt_token_ids", None) or []
    else:
        r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=MAX_TOKENS,
                                      extra_body=extra)
        choice, text = r.choices[0], r.choices[0].text
        prompt_ids = getattr(choice, "prompt_token_ids", None) or getattr(r, "prompt_token_ids", None) or []
    return Answer(text, list(prompt_ids), list(getattr(choice, "token_ids", None) or []))


def first_disagreement(model, answer: Answer) -> Optional[float]:
    """Teacher-forced on vLLM's tokens: the reference's top logit minus the logit of vLLM's
    token at the first position where they are not the same token (None: vLLM always chose the
    reference's argmax)."""
    assert answer.prompt_ids and answer.ids, "vLLM returned no token ids"
    ids = torch.tensor([answer.prompt_ids + answer.ids], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(answer.prompt_ids) - 1:-1].float()
    for position, token in enumerate(answer.ids):
        best = logits[position].max()
        if logits[position].argmax().item() != token:
            return (best - logits[position, token]).item()
    return None


def compare(reference_model, builtin: List[Answer], vllm: List[Answer]) -> tuple[int, List[str]]:
    """(identical answers, failures): a differing answer fails unless its first disagreement
    with the reference is a near-tie."""
    identical, failures = 0, []
    for ours, theirs in zip(builtin, vllm):
        if ours.text == theirs.text:
            identical += 1
            continue
        gap = first_disagreement(reference_model, theirs)
        if gap is None or gap >= NEAR_TIE:
            failures.append(f"{ours.text!r} != {theirs.text!r} (first disagreement: "
                            f"{'none' if gap is None else f'logit gap {gap:.4f}'})")
        else:
            print(f"near-tie divergence (gap {gap:.5f}): {ours.text!r} vs {theirs.text!r}")
    return identical, failures


def answers(client, model: str, token_ids: bool = False) -> List[Answer]:
    return ([ask(client, model, p, True, token_ids) for p in CHATS]
            + [ask(client, model, p, False, token_ids) for p in COMPLETIONS])


def test_exported_adapter_answers_in_vllm_as_in_pipeline_serve(lora_run, tmp_path):
    out = export.export(compose_export([f"run={lora_run}", f"export.output={tmp_path / 'vllm'}"], tmp_path))
    exported = shlex.split((out / "vllm_command.sh").read_text())
    assert exported[:2] == ["vllm", "serve"]

    app = build_app(compose_serve([f"run={lora_run}"], tmp_path / "serve"))
    uv, thread, port = start_server(app)
    proc, url = start_vllm(exported[2:], tmp_path / "vllm.log")
    try:
        ours = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0)
        theirs = openai.OpenAI(base_url=url, api_key="none", max_retries=0)
        assert {m.id for m in theirs.models.list()} >= {"tuned"}
        builtin_tuned, vllm_tuned = answers(ours, "tuned"), answers(theirs, "tuned", token_ids=True)
        base_name = exported[2]  # vLLM serves the base under its path
        vllm_base = answers(theirs, base_name, token_ids=True)
    finally:
        stop(proc)
        uv.should_exit = True
        thread.join(30)

    pool = app.state.service.pool
    with pool.activate(pool.choices["tuned"]) as tuned:
        identical, failures = compare(tuned, builtin_tuned, vllm_tuned)
        print(f"vLLM vs pipeline.serve: {identical} of {len(CHATS) + len(COMPLETIONS)} answers identical")
        assert not failures, "\n".join(failures)
        assert identical >= (len(CHATS) + len(COMPLETIONS)) // 2
        # The check can fail: vLLM's base model (no adapter) is not the tuned model.
        _, wrong = compare(tuned, builtin_tuned, vllm_base)
        assert wrong, "vLLM's base model passed for the tuned model: the adapter changes nothing?"


def test_serve_engine_vllm_serves_the_run_by_its_names_behind_the_key(lora_run, tmp_path):
    """``python -m pipeline.serve run=... server.engine=vllm``: vLLM's server with the built-in
    server's names, address and API key (from PIPELINE_API_KEY, not on its command line)."""
    from tests.conftest import python_path

    port, key, log = free_port(), "vllm-test-key", tmp_path / "serve.log"
    env = {**os.environ, "PIPELINE_API_KEY": key, "PYTHONPATH": python_path()}
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.serve", f"run={lora_run}",
                             "server.engine=vllm", f"server.port={port}", f"paths.output_dir={tmp_path}"],
                            stdout=log.open("w"), stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        wait_until_up(proc, url, log, api_key=key)
        client = openai.OpenAI(base_url=url, api_key=key, max_retries=0)
        assert {m.id for m in client.models.list()} == {"smollm2_135m", "tuned"}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url, api_key="wrong", max_retries=0).models.list()
        tuned = [ask(client, "tuned", p, True, False).text for p in CHATS[:4]]
        base = [ask(client, "smollm2_135m", p, True, False).text for p in CHATS[:4]]
        assert all(tuned) and all(base) and tuned != base
        # Asked at once, base and tuned requests share vLLM's batches: the base must still answer
        # as the base (with no spare adapter slot, vLLM's CPU kernels gave it the adapter).
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            together = list(pool.map(lambda m_p: ask(client, *m_p, True, False).text,
                                     [(m, p) for p in CHATS[:4] for m in ("tuned", "smollm2_135m")]))
        base_together = together[1::2]
        assert sum(a == b for a, b in zip(base_together, base)) >= len(base) - 1, (base_together, base)
        assert sum(a == t for a, t in zip(base_together, tuned)) <= sum(b == t for b, t in zip(base, tuned))
        assert key not in open(f"/proc/{proc.pid}/cmdline").read()
    finally:
        stop(proc)
    assert key not in log.read_text()


def test_evaluation_generation_through_vllm_equals_the_builtin_path(lora_run):
    """The evaluation's generations (``evaluation.engine=vllm``'s path: the same prompt ids,
    saved adapter, decoded by the pipeline's tokenizer) against ``scoring.generate``: the tuned
    model and, from the same engine without the adapter, the base model."""
    data_cfg, model_cfg, _, adapter = read_run(lora_run)
    cache_dir = OmegaConf.load(lora_run / "config.yaml").paths.cache_dir
    folder = loading.resolve_folder(model_cfg, cache_dir, data_cfg.seed)
    tokenizer = loading.load_tokenizer(folder, model_cfg)
    model = load_adapter(loading.load_model(folder, model_cfg), adapter).eval()
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                             add_generation_prompt=True) for p in CHATS] + COMPLETIONS
    decoding = DecodingConfig(max_new_tokens=MAX_TOKENS, seed=0)
    builtin = generate(model, tokenizer, prompts, decoding, batch_size=4)
    with model.disable_adapter():
        builtin_base = generate(model, tokenizer, prompts, decoding, batch_size=4)

    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    with tempfile.TemporaryDirectory() as tmp:
        base, saved = vllm_client.on_disk(model, Path(tmp))
        assert base == folder and (saved / "adapter_config.json").exists()
        with model.disable_adapter():  # pipeline.evaluate measures the base model this way
            assert vllm_client.on_disk(model, Path(tmp) / "off") == (folder, None)
        jobs = [vllm_client.Job(ids, saved), vllm_client.Job(ids)]
        tuned_ids, base_ids = vllm_client.generate(base, "float32", jobs, decoding,
                                                   vllm_client.stop_ids(tokenizer, model)).outputs
    for name, ours, outputs in (("tuned", builtin, tuned_ids), ("base", builtin_base, base_ids)):
        theirs = [Answer(t.strip(), p, o) for t, p, o in
                  zip(tokenizer.batch_decode(outputs, skip_special_tokens=True), ids, outputs)]
        with model.disable_adapter() if name == "base" else contextlib.nullcontext():
            identical, failures = compare(model, [Answer(t, [], []) for t in ours], theirs)
        print(f"{name}: vLLM vs scoring.generate: {identical} of {len(prompts)} generations identical")
        assert not failures, "\n".join(failures)
        assert identical >= len(prompts) // 2
    assert tuned_ids != base_ids  # the adapter was applied to one job only


def test_evaluate_engine_vllm_measures_base_and_tuned_apart(lora_run, tmp_path, monkeypatch):
    """``python -m pipeline.evaluate run=... evaluation.engine=vllm``: one vLLM engine generates
    for both models, the base without the adapter and the tuned model with it; both as the
    built-in engine answers. (A training run measures through the same ``Evaluator.measure``;
    running one end to end with vLLM cost CI 73 s for no path this test leaves out.)"""
    engines, real = [], vllm_client.generate
    monkeypatch.setattr(vllm_client, "generate", lambda *args: engines.append(args) or real(*args))

    def predictions(engine: str) -> list:
        GlobalHydra.instance().clear()
        with initialize_config_dir(str(CONF), version_base="1.3"):
            cfg = compose("evaluate", overrides=[f"run={lora_run}", f"evaluation.engine={engine}",
                                                  "evaluation.max_examples=8", "logger=none",
                                                  f"paths.run_dir={tmp_path / engine}",
                                                  f"paths.root_dir={ROOT}"])
        evaluate(cfg)
        path = tmp_path / engine / "eval" / "predictions.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    builtin, vllm = predictions("transformers"), predictions("vllm")
    assert len(engines) == 1  # one engine start-up for both models
    tuned_jobs = [job.adapter is not None for job in engines[0][2]]
    assert tuned_jobs.count(True) == tuned_jobs.count(False) > 0
    assert [r["base"] for r in vllm] != [r["tuned"] for r in vllm]
    for key in ("base", "tuned"):
        same = sum(a[key] == b[key] for a, b in zip(builtin, vllm))
        print(f"{key}: {same} of {len(vllm)} answers identical to the built-in engine's")
        assert same >= len(vllm) - 1  # one near-tie allowed (checked at token level above)
