"""rl.backend=vllm: the HTTP client against a fake vLLM server that speaks vLLM's JSON shapes.

The fake server answers the endpoints the client uses with the shapes of vLLM's OpenAI server:
- `GET /v1/models` -> {"object": "list", "data": [{"id": ..., "object": "model", ...}]}
  (vllm/entrypoints/openai/protocol.py: ModelList / ModelCard);
- `POST /v1/chat/completions` -> ChatCompletionResponse: {"id", "object": "chat.completion", "model",
  "choices": [{"index", "message": {"role", "content"}, "logprobs": {"content": [{"token":
  "token_id:N", "logprob", "bytes", "top_logprobs": []}]}, "finish_reason": "stop" | "length",
  "stop_reason", "token_ids"}], "usage": {"prompt_tokens", "completion_tokens", "total_tokens"},
  "prompt_token_ids"} (ChatCompletionResponseChoice / ChatCompletionLogProbsContent; the
  "token_id:N" form is what `return_tokens_as_token_ids` asks for, `token_ids`/`prompt_token_ids`
  what `return_token_ids` asks for);
- `POST /collective_rpc` {"method", "args", "kwargs"} -> {"results": [...]} and
  `POST /reset_prefix_cache` -> empty 200 (vllm/entrypoints/serve/dev/rpc/api_router.py, dev mode).
Everything runs on CPU in this process (world of one), but one 2-process TP spawn for the
model-parallel sharing of a rollout.
"""
import base64
import io
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import lingshu_fast.model as M
from lingshu_fast.rl.rewards import register_reward, registered_rewards
from lingshu_fast.rl.vllm_backend import ChatPrompt, VLLMClient, VLLMError

IM_END = 7  # stand-in stop id for the protocol-only tests


def _space_start(response: str, sample: dict) -> float:
    return float(response.startswith(" "))


if "space_start" not in registered_rewards():
    register_reward("space_start", inline=True)(_space_start)


class FakeVLLM:
    """A threaded HTTP server; `script(k, body)` gives choice k's token ids; `faults` are consumed first."""

    def __init__(self, script=None, *, stop_id=IM_END, model="/sync/policy", sync_dir=None):
        self.requests, self.faults, self.calls = [], [], []
        self.script = script or (lambda k, body: [10 + k, 11 + k, stop_id] if k % 2 == 0
                                 else list(range(20, 20 + body["max_tokens"])))
        self.stop_id, self.model, self.sync_dir, self.seen_at_reload = stop_id, model, sync_dir, None
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def _send(self, code, payload=None):
                raw = b"" if payload is None else json.dumps(payload).encode()
                try:
                    self.send_response(code)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(raw)))
                    self.end_headers()
                    self.wfile.write(raw)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    self.close_connection = True

            def _handle(self, method):
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length)) if length else None
                outer.calls.append((method, self.path))
                if outer.faults:
                    fault = outer.faults.pop(0)
                    if isinstance(fault, tuple) and fault[0] == "sleep":  # slower than the client's timeout
                        time.sleep(fault[1])
                        return self._send(200, {"choices": []})
                    if fault == "drop":  # close without an answer: the client sees a reset connection
                        self.close_connection = True
                        self.wfile.flush()
                        self.connection.shutdown(2)
                        return
                    return self._send(*fault) if isinstance(fault, tuple) else self._send(200, fault)
                if (method, self.path) == ("GET", "/v1/models"):
                    return self._send(200, {"object": "list", "data": [{"id": outer.model, "object": "model",
                                                                        "owned_by": "vllm", "root": outer.model}]})
                if (method, self.path) == ("POST", "/v1/chat/completions"):
                    outer.requests.append(body)
                    return self._send(200, outer.answer(body))
                if (method, self.path) == ("POST", "/collective_rpc"):
                    outer.seen_at_reload = sorted(p.name for p in outer.sync_dir.iterdir()) if outer.sync_dir else []
                    return self._send(200, {"results": [None]})
                if (method, self.path) == ("POST", "/reset_prefix_cache"):
                    return self._send(200)
                return self._send(404, {"detail": "Not Found"})

            def do_GET(self):
                self._handle("GET")

            def do_POST(self):
                self._handle("POST")

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def answer(self, body):
        choices = []
        for k in range(body["n"]):
            ids = self.script(k, body)
            stopped = ids[-1] in body["stop_token_ids"]
            content = [{"token": f"token_id:{t}", "logprob": -0.25 * (j + 1) - k, "bytes": [], "top_logprobs": []}
                       for j, t in enumerate(ids)]
            choices.append({"index": k, "message": {"role": "assistant", "content": "..."},
                            "logprobs": {"content": content}, "finish_reason": "stop" if stopped else "length",
                            "stop_reason": ids[-1] if stopped else None})
        choices.reverse()  # the client must order by index, not by position
        return {"id": "chatcmpl-1", "object": "chat.completion", "model": body["model"], "choices": choices,
                "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake():
    server = FakeVLLM()
    yield server
    server.close()


def _client(url, **kw):
    return VLLMClient(url, vocab_size=kw.pop("vocab_size", 1024), retry_wait_s=0.01, **kw)


def test_requests_and_prompt_major_outputs(fake):
    """Pins: the request carries n / temperature / top_p / max_tokens / the <|im_end|> stop id / the
    logprob+token-id switches and the images as PNG data URLs; outputs come back prompt-major with
    choice order by `index` (the fake returns them reversed), ids from 'token_id:N', logprobs in
    order, finished only when stopped on the stop id."""
    client = _client(fake.url)
    assert client.model_name == "/sync/policy"
    base = fake.script  # the text-only prompt's samples are shifted by 100: prompt order is visible
    fake.script = lambda k, body: [t + (100 if isinstance(body["messages"][0]["content"], str) and t != IM_END else 0)
                                   for t in base(k, body)]
    pixel = np.zeros((28, 56, 3), np.uint8)
    from lingshu_fast.rl.vllm_backend import openai_messages

    msgs = openai_messages([{"role": "user", "content": "look <image> here"}], [pixel])
    prompts = [ChatPrompt(msgs, prompt_ids=[1, 2, 3, 4, 5]), ChatPrompt([{"role": "user", "content": "no image"}])]
    outs = client.generate(prompts, n=3, max_new_tokens=4, temperature=0.7, top_p=0.9, stop_token_ids=[IM_END])
    assert client.stats.prompt_mismatches == 0  # usage.prompt_tokens == 5 == len(prompt_ids)
    assert len(outs) == 6 and len(fake.requests) == 2
    for body in fake.requests:
        assert (body["n"], body["temperature"], body["top_p"], body["max_tokens"]) == (3, 0.7, 0.9, 4)
        assert body["stop_token_ids"] == [IM_END] and body["ignore_eos"] is True
        assert body["logprobs"] is True and body["return_tokens_as_token_ids"] is True
        assert body["model"] == "/sync/policy"
    parts = next(b for b in fake.requests if isinstance(b["messages"][0]["content"], list))["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["text", "image_url", "text"]
    url = parts[1]["image_url"]["url"]
    assert url.startswith("data:image/png;base64,")
    from PIL import Image

    assert Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))).size == (56, 28)
    for p, shift in enumerate([0, 100]):
        group = outs[3 * p:3 * p + 3]
        assert group[0].token_ids == [10 + shift, 11 + shift, IM_END] and group[0].finished
        assert group[1].token_ids == [20 + shift, 21 + shift, 22 + shift, 23 + shift] and not group[1].finished
        assert group[2].token_ids == [12 + shift, 13 + shift, IM_END] and group[2].finished
        assert group[2].logprobs == pytest.approx([-2.25, -2.5, -2.75])
    with pytest.warns(UserWarning, match="rendered prompt r:1 differently"):
        client.generate([ChatPrompt(msgs, prompt_ids=[1, 2, 3], where="r:1")], n=1, max_new_tokens=2,
                        temperature=1.0, top_p=1.0, stop_token_ids=[IM_END])
    assert client.stats.prompt_mismatches == 1


def test_unreachable_malformed_and_bad_ids(fake):
    """Pins the user-facing errors: a dead URL names itself and the server command; an empty answer,
    a token that is not 'token_id:N' (server ignored the switch) and an id outside the vocabulary
    are errors, never silently trained on."""
    with pytest.raises(VLLMError, match=r"cannot reach the vLLM server at http://127\.0\.0\.1:9.*vllm serve"):
        VLLMClient("http://127.0.0.1:9", vocab_size=1024, retries=1, retry_wait_s=0.01)
    client = _client(fake.url)
    prompt = [ChatPrompt([{"role": "user", "content": "q"}], where="rec.jsonl:3")]
    kw = dict(n=2, max_new_tokens=3, temperature=1.0, top_p=1.0, stop_token_ids=[IM_END])
    fake.faults.append({"id": "x", "choices": []})
    with pytest.raises(VLLMError, match="rec.jsonl:3: empty answer"):
        client.generate(prompt, **kw)
    fake.faults.append((200, None))  # 200 with an empty body
    with pytest.raises(VLLMError, match="empty answer"):
        client.generate(prompt, **kw)
    bad_token = fake.answer({"n": 2, "max_tokens": 3, "stop_token_ids": [IM_END], "model": "m"})
    bad_token["choices"][0]["logprobs"]["content"][0]["token"] = "hello"
    fake.faults.append(bad_token)
    with pytest.raises(VLLMError, match="not 'token_id:N'"):
        client.generate(prompt, **kw)
    with pytest.raises(VLLMError, match=r"token ids \[10, 11\] are outside the policy's vocabulary of 8"):
        _client(fake.url, vocab_size=8).generate(prompt, **kw)
    fake.faults.append((400, {"object": "error", "message": "max_tokens too large"}))
    with pytest.raises(VLLMError, match="HTTP 400.*max_tokens too large"):
        client.generate(prompt, **kw)


def test_retries_a_transient_failure(fake):
    """Pins the bounded retry: a dropped connection and a 503 are retried and the answer is the
    normal one; more failures than `retries` give the clear error instead of looping forever."""
    client = _client(fake.url, retries=2)
    prompt = [ChatPrompt([{"role": "user", "content": "q"}])]
    kw = dict(n=2, max_new_tokens=3, temperature=1.0, top_p=1.0, stop_token_ids=[IM_END])
    fake.faults += ["drop", (503, {"detail": "loading"})]
    outs = client.generate(prompt, **kw)
    assert outs[0].token_ids == [10, 11, IM_END] and client.stats.retries == 2
    fake.faults += [(503, {"detail": "loading"})] * 3
    with pytest.raises(VLLMError, match="HTTP 503"):
        client.generate(prompt, **kw)
    client.timeout_s = 0.2
    fake.faults.append(("sleep", 0.6))
    with pytest.raises(VLLMError, match=r"no answer in 0.2 s \(rl.vllm_timeout_s\)"):
        client.generate(prompt, **kw)


@pytest.mark.usefixtures("world_of_one")
def test_rollout_through_backend_and_weight_push(tmp_path):
    """Pins the integration: `collect_rollout(..., backend=client)` on the tiny model's tokenizer and
    the demo RL records (with images) sends the record as chat messages (system turn included,
    image resized to the prompt's grid), and yields responses in group order with rewards; then
    `push_weights` writes a folder transformers loads with the policy's tensors, keeps the folder's
    processor file, and only then calls reload_weights + reset_prefix_cache."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from lingshu_fast.config import load_config
    from lingshu_fast.data.demo_data import build_demo_dataset
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.rl.rollout import PromptDataset, collect_rollout
    from lingshu_fast.train.tiny import ensure_tiny_model

    data = build_demo_dataset(tmp_path / "data", num_train_images=8, num_eval_images=2)
    cfg = load_config("tiny-rl", [f"data.train=[{data['rl']}]", "rl.rewards=[space_start:1.0]",
                                  "rl.num_generations=2", "rl.max_new_tokens=3", "rl.rollout_batch=2"])
    tokenizer = load_tokenizer("tiny")
    model = M.from_pretrained(str(ensure_tiny_model(tmp_path / "tiny", tokenizer)))
    dataset = PromptDataset(cfg.data.train, tokenizer, cfg.data, max_new_tokens=3, seed=1)
    im_end = dataset.token_ids["im_end_id"]
    space, plain = tokenizer.encode(" yes", add_special_tokens=False), tokenizer.encode("no", add_special_tokens=False)
    sync = tmp_path / "sync"
    sync.mkdir()
    (sync / "preprocessor_config.json").write_text('{"min_pixels": 3136}')
    server = FakeVLLM(lambda k, body: (space if k == 0 else plain)[:2] + [im_end], sync_dir=sync)
    try:
        # one request at a time: the fake's request log is then in prompt order
        client = _client(server.url, vocab_size=model.config.text_config.vocab_size, sync_dir=str(sync),
                         max_concurrency=1)
        indices = dataset.next_indices(2)
        with pytest.warns(UserWarning, match="rendered prompt"):  # the fake's usage.prompt_tokens is a constant
            ro = collect_rollout(model, dataset, indices, cfg.rl, tokenizer, seed=0, backend=client)
        assert len(server.requests) == 2 and ro.rewards.tolist() == [1.0, 0.0, 1.0, 0.0]
        assert ro.finished.all() and ro.responses[0] == space[:2] + [im_end]
        for body, i in zip(server.requests, indices):
            assert body["stop_token_ids"] == [im_end] and body["n"] == 2 and body["max_tokens"] == 3
            system, *rest = body["messages"]
            assert system == {"role": "system", "content": dataset.template.system_prompt}
            images = [p for m in rest if isinstance(m["content"], list) for p in m["content"]
                      if p["type"] == "image_url"]
            assert len(images) == len(dataset.samples[i].images) >= 1
            from PIL import Image

            size = Image.open(io.BytesIO(base64.b64decode(images[0]["image_url"]["url"].split(",", 1)[1]))).size
            _, h, w = dataset.grid(i)[0].tolist()
            assert size == (w * 14, h * 14)

        with torch.no_grad():
            next(p for p in model.parameters()).add_(1.0)  # an "update": the push must carry it
        client.push_weights(model, step=5)
        assert server.calls[-2:] == [("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache")]
        assert "config.json" in server.seen_at_reload and "preprocessor_config.json" in server.seen_at_reload
        assert any(n.endswith(".safetensors") for n in server.seen_at_reload) and client.weights_step == 5
        written = {}
        for shard in sync.glob("*.safetensors"):
            written.update(load_file(shard))
        expected = M.full_hf_state_dict(model)
        assert written.keys() == expected.keys()
        assert all(torch.equal(written[k], expected[k].to(written[k].dtype)) for k in expected)
        hf = Qwen2_5_VLForConditionalGeneration.from_pretrained(str(sync))
        assert sum(p.numel() for p in hf.parameters()) > 0
    finally:
        server.close()


class _StubDataset:
    """What `chat_prompt` reads from a PromptDataset, without files."""

    def __init__(self):
        self.ids = [np.arange(4), np.arange(6)]
        self.samples = [type("S", (), {"source": f"stub:{i}"})() for i in range(2)]

    def chat_messages(self, index):
        return [{"role": "user", "content": f"question {index}"}]

    def chat_images(self, index):
        return []


def _tp_rollout(dims, url):
    client = VLLMClient(url, vocab_size=1024, retry_wait_s=0.01)
    rl = type("RL", (), dict(num_generations=2, max_new_tokens=3, temperature=1.0, top_p=1.0))()
    outs = client.generate_rollout(_StubDataset(), [1, 0], rl, stop_token_ids=[IM_END])
    return client.is_sender, [(o.token_ids, o.logprobs, o.finished) for o in outs]


def test_model_parallel_group_shares_one_set_of_requests(fake):
    """Pins: under TP=2 only one rank of the model-parallel group sends the requests (the server sees
    one per prompt, not one per rank) and both ranks get identical outputs."""
    from lingshu_fast.parallel.spawn import spawn

    results = spawn(_tp_rollout, 2, fake.url, tp=2)
    assert sorted(r[0] for r in results) == [False, True]
    assert results[0][1] == results[1][1] and len(results[0][1]) == 4
    assert len(fake.requests) == 2
    assert sorted(b["messages"][0]["content"] for b in fake.requests) == ["question 0", "question 1"]
    assert [c for c in fake.calls if c[1] == "/v1/models"] == [("GET", "/v1/models")]  # one health check


def test_config_requires_url_and_sync_dir():
    """Pins the one-line config errors: rl.backend=vllm without a server URL or a sync folder fails at
    load time, before any model is built; a non-positive timeout too."""
    from lingshu_fast.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="rl.backend=vllm needs rl.vllm_url"):
        load_config("tiny-rl", ["rl.backend=vllm", "rl.vllm_sync_dir=/tmp/s"])
    with pytest.raises(ConfigError, match="rl.backend=vllm needs rl.vllm_sync_dir"):
        load_config("tiny-rl", ["rl.backend=vllm", "rl.vllm_url=http://localhost:8000"])
    with pytest.raises(ConfigError, match="rl.vllm_timeout_s must be > 0"):
        load_config("tiny-rl", ["rl.vllm_timeout_s=0"])
    cfg = load_config("tiny-rl", ["rl.backend=vllm", "rl.vllm_url=http://h:8000", "rl.vllm_sync_dir=/tmp/s"])
    assert (cfg.rl.vllm_sync_dir, cfg.rl.vllm_timeout_s) == ("/tmp/s", 600.0)


@pytest.mark.usefixtures("world_of_one")
def test_train_rl_samples_on_the_server_and_pushes_after_each_rollout(tmp_path):
    """Pins the loop's wiring of rl.backend=vllm: every rollout's prompts go to the server (one
    request per prompt), the rewards of its answers reach the metrics rows, and the policy is
    pushed at start (the server must sample the resumed policy) and after each rollout's update
    but not after the last step (nobody would sample it)."""
    from lingshu_fast.config import load_config
    from lingshu_fast.data.demo_data import build_demo_dataset
    from lingshu_fast.data.tokenizer import load_tokenizer
    from lingshu_fast.parallel.state import current_dims
    from lingshu_fast.rl.loop import train_rl

    data = build_demo_dataset(tmp_path / "data", num_train_images=8, num_eval_images=2)
    tokenizer = load_tokenizer("tiny")
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    space, plain = tokenizer.encode(" yes", add_special_tokens=False), tokenizer.encode("no", add_special_tokens=False)
    sync = tmp_path / "sync"
    server = FakeVLLM(lambda k, body: (space if k % 2 == 0 else plain)[:2] + [im_end], sync_dir=sync)
    try:
        cfg = load_config("tiny-rl", [
            f"run.dir={tmp_path / 'run'}", f"data.train=[{data['rl']}]", "run.progress=false",
            "rl.rewards=[space_start:1.0]", "rl.rollout_batch=2", "rl.num_generations=2", "rl.max_new_tokens=3",
            "rl.updates_per_rollout=1", "train.max_steps=3", "rl.beta=0.0", "checkpoint.every=0",
            "rl.backend=vllm", f"rl.vllm_url={server.url}", f"rl.vllm_sync_dir={sync}"])
        with pytest.warns(UserWarning, match="rendered prompt"):  # the fake's usage.prompt_tokens is a constant
            summary = train_rl(cfg, current_dims())
        reloads = [c for c in server.calls if c[1] == "/collective_rpc"]
        rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
        assert len(server.requests) == 3 * 2  # three rollouts of two prompts
        assert len(reloads) == 3  # at start, after steps 1 and 2; not after the last
        assert [r["reward_mean"] for r in rows if "reward_mean" in r] == [0.5, 0.5, 0.5]
        assert summary["steps"] == 3 and any(p.name.endswith(".safetensors") for p in sync.iterdir())
    finally:
        server.close()
