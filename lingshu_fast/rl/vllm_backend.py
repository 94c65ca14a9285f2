"""Optional stage-4 rollout backend: sampling on a vLLM OpenAI-compatible server that the user starts.

Our own KV-cache generator stays the default (`rl.backend: native`) and the only one tested on
CPU; `rl.backend: vllm` sends the rollouts to a vLLM server and pushes the policy to it before
every rollout that follows an update (rl/loop.py: at start, then after each rollout's updates). Only the standard library talks HTTP (urllib + json): no new dependency.

Start the server (vLLM >= 0.10, on GPUs the trainer does not use) on the folder the trainer
writes its weights to, in dev mode (the reload endpoint exists only there):

    # once: the starting policy (the stage-3 HF export) in the sync folder, then
    cp -r STAGE3_HF_DIR /shared/lingshu-sync
    VLLM_SERVER_DEV_MODE=1 vllm serve /shared/lingshu-sync --port 8000 \
        --max-model-len 8192 --enable-prefix-caching --limit-mm-per-prompt '{"image": 4}'

and train with `rl.backend=vllm rl.vllm_url=http://HOST:8000 rl.vllm_sync_dir=/shared/lingshu-sync`
(the folder must be the one the server was started on, on storage both machines see).

Protocol (taken from vLLM's sources, vllm/entrypoints/openai/protocol.py and
vllm/entrypoints/serve/dev/rpc/api_router.py):
- `GET /v1/models` at construction: health check, and the served model name used in requests.
- Generation: one `POST /v1/chat/completions` per prompt with `n` = rl.num_generations,
  `temperature`, `top_p`, `max_tokens` = rl.max_new_tokens, `stop_token_ids: [<|im_end|>]` with
  `ignore_eos: true` (so, like our generator, only `<|im_end|>` or the length limit ends a
  response), `logprobs: true, top_logprobs: 0` and `return_tokens_as_token_ids: true` (each
  logprob entry's token reads "token_id:N"); `return_token_ids: true` too, which newer servers
  answer with `choices[i].token_ids` and `prompt_token_ids` (older ones ignore the field). The
  chat completions endpoint is the only one of vLLM's HTTP APIs that takes images: they travel
  as `image_url` parts holding base64 PNG data URLs, decoded from the record's files here (DICOM
  included) and resized to the very grid our prompt was rendered with, so the server's Qwen2.5-VL
  processor (smart_resize of a side that is already a multiple of 28) gives the same image tokens.
  The system turn our template adds is sent explicitly. When the server returns its prompt ids
  (or only `usage.prompt_tokens`), a prompt that differs from ours is warned about once (the
  update trains on our rendering; a different server chat template would make it off-policy).
- Weight push, before the next rollout samples: every rank calls `save_pretrained` into
  rl.vllm_sync_dir (collective; atomic folder swap; the folder's tokenizer/processor files are
  kept), then global rank 0 calls `POST /collective_rpc {"method": "reload_weights"}` (each
  worker re-reads the weights from the path the server was started on) and
  `POST /reset_prefix_cache` (cached KV was computed by the old weights); a broadcast from rank 0
  is the barrier: no rank samples before the server has the new weights. vLLM also offers
  NCCL weight transfer (`/init_weight_transfer_engine` + `/update_weights`, TRL's and verl's way);
  it needs the server's GPUs in our process group and is not implemented here.

What differs from our generator: the server does not take our sampling seed (with `n` > 1 some
vLLM versions repeat one sample per seeded request), so vLLM rollouts are not reproducible; the
returned log-probs follow the server's `--logprobs-mode` (default: raw log-probs before
temperature), and the loop does not use them (old log-probs are recomputed by the policy).

Parallel layout: per data-parallel shard, only rank 0 of its model-parallel group (TP x PP ranks)
sends requests; the outputs (or the error) go to the other ranks of that group with
`broadcast_object_list`.

Time limit: rl.vllm_timeout_s bounds each request as a whole - connecting, retries, waiting for
the headers and reading the body - not each socket read: a server (or proxy) that sends a byte
every few seconds never trips a per-read timeout (`lingshu_fast.net` shuts the request's socket
down at the deadline, which ends whatever read is blocked); the call then raises VLLMError.
"""
from __future__ import annotations

import base64
import http.client
import io
import json
import os
import socket
import time
import urllib.error
import urllib.request
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch.distributed as dist

from lingshu_fast import net
from lingshu_fast.data.template import IMAGE_MARKER
from lingshu_fast.model.export_folder import EXPORT_MARKER
from lingshu_fast.model.generate import GenerationOutput

SERVER_COMMAND = ("VLLM_SERVER_DEV_MODE=1 vllm serve RL_VLLM_SYNC_DIR --port 8000 --enable-prefix-caching "
                  "--limit-mm-per-prompt '{\"image\": 4}'  (see lingshu_fast/rl/vllm_backend.py)")
_RETRY_HTTP_CODES = (502, 503, 504)  # a proxy or a server still starting: worth another try
_WEIGHT_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json")


class VLLMError(RuntimeError):
    """The vLLM server was unreachable, refused a request, or answered something we cannot train on."""


@dataclass
class ChatPrompt:
    """One prompt as the server takes it, plus our own ids to compare with the server's rendering."""
    messages: list[dict]
    prompt_ids: Optional[list[int]] = None
    where: str = ""  # the record, for error messages


@dataclass
class _Stats:
    prompt_mismatches: int = 0
    requests: int = 0
    retries: int = 0


def _png_data_url(rgb: np.ndarray) -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8)).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def openai_messages(messages: Sequence[dict], images: Sequence[np.ndarray]) -> list[dict]:
    """Our messages (strings with `<image>` markers, images in order) -> OpenAI content-part messages."""
    out, used = [], 0
    for message in messages:
        pieces = message["content"].split(IMAGE_MARKER)
        if len(pieces) == 1:
            out.append({"role": message["role"], "content": message["content"]})
            continue
        parts = []
        for k, text in enumerate(pieces):
            if text:
                parts.append({"type": "text", "text": text})
            if k + 1 < len(pieces):
                if used >= len(images):
                    raise VLLMError(f"{len(images)} images for more <image> markers in the messages")
                parts.append({"type": "image_url", "image_url": {"url": _png_data_url(images[used])}})
                used += 1
        out.append({"role": message["role"], "content": parts})
    if used != len(images):
        raise VLLMError(f"{len(images)} images but {used} <image> markers in the messages")
    return out


def chat_prompt(dataset, index: int) -> ChatPrompt:
    """A `PromptDataset` record as a `ChatPrompt` (images decoded and resized to the prompt's grid)."""
    return ChatPrompt(openai_messages(dataset.chat_messages(index), dataset.chat_images(index)),
                      prompt_ids=dataset.ids[index].tolist(), where=str(dataset.samples[index].source))


def _model_parallel_group():
    """(group or None, am I the rank that talks HTTP, its global rank) for this rank's TP x PP group."""
    if not dist.is_available() or not dist.is_initialized():
        return None, True, 0
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        return None, True, dist.get_rank()
    group = ps.get_model_parallel_group()
    if dist.get_world_size(group) == 1:
        return None, True, dist.get_rank()
    src = dist.get_global_rank(group, 0)
    return group, dist.get_rank() == src, src


def _share(value, src: int, group) -> object:
    """`value` of rank `src` on every rank of `group` (None group: this rank alone)."""
    if group is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


class VLLMClient:
    """Client of one vLLM server: `generate`/`generate_rollout` for sampling, `push_weights` after updates.

    Construct it on every rank (collective when torch.distributed is initialised); the ranks that
    will send requests check the server first and every rank raises if one of them cannot reach it.
    """

    def __init__(self, url: str, *, vocab_size: int, sync_dir: Optional[str] = None, tokenizer=None,
                 timeout_s: float = 600.0, retries: int = 3, retry_wait_s: float = 1.0, max_concurrency: int = 64):
        if not url or not url.startswith(("http://", "https://")):
            raise VLLMError(f"rl.vllm_url={url!r} must be an http(s) URL such as http://localhost:8000")
        self.url = url.rstrip("/").removesuffix("/v1")
        self.vocab_size, self.sync_dir, self.tokenizer = int(vocab_size), sync_dir, tokenizer
        self.timeout_s, self.retries, self.retry_wait_s = float(timeout_s), int(retries), float(retry_wait_s)
        self.max_concurrency = max(1, int(max_concurrency))
        self.stats = _Stats()
        self.weights_step: Optional[int] = None
        self.group, self.is_sender, self.src = _model_parallel_group()
        error = None
        self.model_name = None
        if self.is_sender:
            try:
                self.model_name = self._served_model()
            except VLLMError as err:
                error = str(err)
        errors = [error]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            errors = [None] * dist.get_world_size()
            dist.all_gather_object(errors, error)
        first = next((e for e in errors if e), None)
        if first:
            raise VLLMError(first)

    # ------------------------------------------------------------------ HTTP
    def _call(self, method: str, path: str, body: Optional[dict] = None, *, timeout_s: Optional[float] = None):
        """JSON request with a bounded retry on connection errors / 502-504; the decoded answer (None if
        empty). `timeout_s` (default rl.vllm_timeout_s) bounds the whole call, retries included."""
        data = None if body is None else json.dumps(body).encode()
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        deadline = net.Deadline(timeout_s)
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(self.url + path, data=data, method=method,
                                             headers={"Content-Type": "application/json"})
            try:
                raw = net.urlopen_read(request, deadline)
                break
            except urllib.error.HTTPError as err:  # the server answered: a retry only for gateway codes
                detail = err.read()[:500].decode(errors="replace")
                if err.code in _RETRY_HTTP_CODES and attempt < self.retries and self._wait(attempt, deadline):
                    continue
                hint = (" (the endpoint exists only in dev mode: start the server with VLLM_SERVER_DEV_MODE=1)"
                        if err.code == 404 and path in ("/collective_rpc", "/reset_prefix_cache") else "")
                raise VLLMError(f"vLLM server {self.url}: {method} {path} failed with HTTP {err.code}: "
                                f"{detail}{hint}") from None
            except (TimeoutError, socket.timeout):  # the whole call, retries included, is over time
                raise VLLMError(f"vLLM server {self.url}: {method} {path} got no answer in {timeout_s:g} s "
                                f"(rl.vllm_timeout_s); raise it for long generations") from None
            except (OSError, http.client.HTTPException) as err:  # refused, reset, cut short
                if attempt < self.retries and self._wait(attempt, deadline):
                    continue
                reason = getattr(err, "reason", err)
                raise VLLMError(f"cannot reach the vLLM server at {self.url} ({reason}) after {attempt + 1} "
                                f"tries. Start it first, e.g.: {SERVER_COMMAND}") from None
        self.stats.requests += 1
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except json.JSONDecodeError:
            raise VLLMError(f"vLLM server {self.url}: {method} {path} answered non-JSON: {raw[:200]!r}") from None

    def _wait(self, attempt: int, deadline: net.Deadline) -> bool:
        """Back off before another try; False (no try left) when the wait would pass the deadline."""
        wait_s = self.retry_wait_s * 2 ** attempt
        if wait_s >= deadline.remaining_s():
            return False
        self.stats.retries += 1
        time.sleep(wait_s)
        return True

    def _served_model(self) -> str:
        answer = self._call("GET", "/v1/models", timeout_s=min(self.timeout_s, 30.0))
        models = (answer or {}).get("data") or []
        if not models or not isinstance(models[0], dict) or "id" not in models[0]:
            raise VLLMError(f"vLLM server {self.url}: GET /v1/models lists no model: {str(answer)[:200]}")
        return str(models[0]["id"])

    # ------------------------------------------------------------------ sampling
    def _one(self, prompt: ChatPrompt, body: dict, n: int, stop_ids: set[int]) -> list[GenerationOutput]:
        answer = self._call("POST", "/v1/chat/completions", {**body, "messages": prompt.messages})
        return self._parse(answer, prompt, n, stop_ids)

    def _parse(self, answer, prompt: ChatPrompt, n: int, stop_ids: set[int]) -> list[GenerationOutput]:
        where = f"vLLM server {self.url}, prompt {prompt.where or '?'}"
        choices = (answer or {}).get("choices") if isinstance(answer, dict) else None
        if not choices:
            raise VLLMError(f"{where}: empty answer (no choices): {str(answer)[:200]}")
        if sorted(c.get("index", -1) for c in choices) != list(range(n)):
            raise VLLMError(f"{where}: expected choices 0..{n - 1}, got indices {[c.get('index') for c in choices]}")
        self._check_prompt(answer, prompt)
        outs = []
        for choice in sorted(choices, key=lambda c: c["index"]):
            entries = ((choice.get("logprobs") or {}).get("content")) or []
            ids = choice.get("token_ids")
            if ids is None:
                ids = [_token_id(e.get("token"), where) for e in entries]
            logprobs = [float(e.get("logprob")) for e in entries]
            if not ids:
                raise VLLMError(f"{where}: choice {choice['index']} has no tokens (was the request's "
                                f"logprobs/return_tokens_as_token_ids dropped by a proxy?)")
            if len(logprobs) != len(ids):
                raise VLLMError(f"{where}: choice {choice['index']} has {len(ids)} tokens but {len(logprobs)} logprobs")
            bad = [t for t in ids if not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise VLLMError(f"{where}: token ids {bad[:5]} are outside the policy's vocabulary of "
                                f"{self.vocab_size}: is the server running another model?")
            reason = choice.get("finish_reason")
            if reason not in ("stop", "length"):
                raise VLLMError(f"{where}: choice {choice['index']} ended with finish_reason={reason!r}")
            outs.append(GenerationOutput(token_ids=list(ids), logprobs=logprobs,
                                         finished=reason == "stop" and ids[-1] in stop_ids))
        return outs

    def _check_prompt(self, answer: dict, prompt: ChatPrompt) -> None:
        if prompt.prompt_ids is None:
            return
        server_ids = answer.get("prompt_token_ids")
        if server_ids is not None:
            same = list(server_ids) == prompt.prompt_ids
        else:
            same = (answer.get("usage") or {}).get("prompt_tokens", len(prompt.prompt_ids)) == len(prompt.prompt_ids)
        if not same:
            self.stats.prompt_mismatches += 1
            if self.stats.prompt_mismatches == 1:
                warnings.warn(f"vLLM server {self.url} rendered prompt {prompt.where or '?'} differently from our "
                              f"chat template (the update trains on ours): check the served folder's chat template "
                              f"and the image pixel limits", stacklevel=2)

    def generate(self, prompts: Sequence[ChatPrompt], *, n: int, max_new_tokens: int, temperature: float,
                 top_p: float, stop_token_ids: Sequence[int]) -> list[GenerationOutput]:
        """`n` samples per prompt, prompt-major (p0 x n, p1 x n ...), as our generator's `repeats`.
        Local: no collectives (see `generate_rollout` for the model-parallel sharing)."""
        if max_new_tokens < 1 or n < 1:
            raise ValueError(f"max_new_tokens and n must be >= 1, got {max_new_tokens}, {n}")
        body = {"model": self.model_name, "n": int(n), "temperature": float(temperature), "top_p": float(top_p),
                "max_tokens": int(max_new_tokens), "stop_token_ids": [int(t) for t in stop_token_ids],
                "ignore_eos": True, "skip_special_tokens": False, "include_stop_str_in_output": True,
                "logprobs": True, "top_logprobs": 0, "return_tokens_as_token_ids": True, "return_token_ids": True}
        stop_ids = set(body["stop_token_ids"])
        if not prompts:
            return []
        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(prompts))) as pool:
            groups = list(pool.map(lambda p: self._one(p, body, n, stop_ids), prompts))
        return [out for group in groups for out in group]

    def generate_rollout(self, dataset, indices: Sequence[int], rl_cfg, *,
                         stop_token_ids: Sequence[int]) -> list[GenerationOutput]:
        """The rollout of `indices` (this DP shard): one rank of the model-parallel group asks the
        server, the others receive its outputs. Every rank of the group calls this."""
        result, error, failure = None, None, None
        if self.is_sender:
            try:
                prompts = [chat_prompt(dataset, i) for i in indices]
                result = self.generate(prompts, n=rl_cfg.num_generations, max_new_tokens=rl_cfg.max_new_tokens,
                                       temperature=rl_cfg.temperature, top_p=rl_cfg.top_p,
                                       stop_token_ids=stop_token_ids)
            except Exception as err:  # noqa: BLE001 - the group's other ranks must not wait forever
                failure, error = err, f"{type(err).__name__}: {err}"
        result, error = _share((result, error), self.src, self.group)
        if failure is not None:
            raise failure
        if error:
            raise VLLMError(f"the rank that talks to the vLLM server failed: {error}")
        return result

    # ------------------------------------------------------------------ weights
    def push_weights(self, model, step: int) -> None:
        """Write the policy to rl.vllm_sync_dir and make the server reload it. Collective over all ranks."""
        from lingshu_fast.model import save_pretrained
        from lingshu_fast.model.export_folder import adopt_folder

        if not self.sync_dir:
            raise VLLMError("rl.backend=vllm needs rl.vllm_sync_dir: the folder the vLLM server was started on")
        rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        error = None
        kept: dict = {}
        if rank == 0:
            try:  # an unreadable folder must not leave the other ranks waiting in save_pretrained
                kept = _read_side_files(self.sync_dir)
                adopt_folder(self.sync_dir)  # its weights are ours to replace; every other file is carried over
            except OSError as err:
                error = f"weight push of step {step}: cannot read {self.sync_dir}: {err}"

        def side_files(folder: str) -> None:  # rank 0, inside the export before it is published
            for name, blob in kept.items():
                with open(os.path.join(folder, name), "wb") as f:
                    f.write(blob)
            if self.tokenizer is not None and not kept:
                self.tokenizer.save_pretrained(folder)

        save_pretrained(model, self.sync_dir, extra_files=side_files if rank == 0 else None)
        if rank == 0 and error is None:
            try:
                self._call("POST", "/collective_rpc", {"method": "reload_weights"})
                self._call("POST", "/reset_prefix_cache")
            except (VLLMError, OSError) as err:
                error = f"weight push of step {step}: {err}"
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            box = [error]
            dist.broadcast_object_list(box, src=0)  # also the barrier before anyone samples again
            error = box[0]
        if error:
            raise VLLMError(error)
        self.weights_step = int(step)


def _token_id(token, where: str) -> int:
    if not isinstance(token, str) or not token.startswith("token_id:"):
        raise VLLMError(f"{where}: token {str(token)[:40]!r} is not 'token_id:N' (the server ignored "
                        f"return_tokens_as_token_ids: vLLM >= 0.5 is needed)")
    try:
        return int(token[len("token_id:"):])
    except ValueError:
        raise VLLMError(f"{where}: malformed token {token[:40]!r}") from None


def _read_side_files(folder: str) -> dict[str, bytes]:
    """The folder's tokenizer/processor/template files (everything but the weights, the configs we write
    and our export marker)."""
    if not os.path.isdir(folder):
        return {}
    out = {}
    for name in sorted(os.listdir(folder)):
        path = os.path.join(folder, name)
        if os.path.isfile(path) and not name.endswith(".safetensors") and name not in _WEIGHT_FILES + (EXPORT_MARKER,):
            with open(path, "rb") as f:
                out[name] = f.read()
    return out
