"""``scaletrain serve`` as users meet it: one real server process on
127.0.0.1 (the debug model in a run directory), queried with the official
``openai`` client and, for the error contract, raw HTTP."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from harness import run_cli
from serve_harness import ServerProcess, expected_greedy, make_tiny_run

openai = pytest.importorskip("openai")



@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, debug_config):
    return make_tiny_run(tmp_path_factory.mktemp("serve"), debug_config)


@pytest.fixture(scope="module")
def server(run_dir):
    srv = ServerProcess(str(run_dir), ["--served-model-name", "tiny", "--block-size", "8", "--max-batch-tokens", "64"])
    yield srv
    assert srv.stop() == 0, srv.output()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", timeout=60, max_retries=0)


def metric(server, name: str, label: str = "", headers: dict | None = None) -> float:
    text = httpx.get(f"{server.url}/metrics", headers=headers, timeout=10).text
    line = next(l for l in text.splitlines() if l.startswith(f"scaletrain:{name}{{") and label in l)
    assert 'model_name="tiny"' in line
    return float(line.rsplit(" ", 1)[1])


def test_models_and_greedy_completion_match_the_model(server, client, run_dir):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    prompt = "import os\ndef "
    done = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected_greedy(run_dir, prompt, 24)
    assert done.usage.prompt_tokens == len(prompt.encode()) and done.usage.completion_tokens <= 24
    assert done.choices[0].finish_reason in ("length", "stop")


def test_chat_stream_with_usage_equals_the_plain_response(server, client):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "print hello"}]
    plain = client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0)
    chunks = list(client.chat.completions.create(model="tiny", messages=messages, max_tokens=20, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content and plain.choices[0].message.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    assert plain.usage.prompt_tokens == len("<|system|>\nbe brief\n<|user|>\nprint hello\n<|assistant|>\n")
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [plain.choices[0].finish_reason]
    raw = httpx.post(f"{server.url}/v1/completions", json={"model": "tiny", "prompt": "x", "max_tokens": 3,
                                                           "stream": True}, timeout=30).text
    assert raw.rstrip().endswith("data: [DONE]") and raw.count("data: ") >= 2


def test_seeded_sampling_n_stop_and_logprobs(server, client, run_dir):
    args = dict(model="tiny", prompt="class A:\n", max_tokens=16, temperature=0.8, top_p=0.95, seed=7, n=2)
    first, again = client.completions.create(**args), client.completions.create(**args)
    assert [c.text for c in first.choices] == [c.text for c in again.choices]
    assert first.usage.prompt_tokens == len("class A:\n")
    greedy = expected_greedy(run_dir, "def f", 16)
    stop = greedy[4:6]
    stopped = client.completions.create(model="tiny", prompt="def f", max_tokens=16, temperature=0, stop=[stop])
    assert stopped.choices[0].text == greedy[:greedy.find(stop)] and stopped.choices[0].finish_reason == "stop"
    with_lp = client.completions.create(model="tiny", prompt="def f", max_tokens=4, temperature=0, logprobs=3)
    lp = with_lp.choices[0].logprobs
    assert len(lp.token_logprobs) == 4 and all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) <= 3 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs, lp.token_logprobs))


@pytest.mark.parametrize("body, status, param", [
    ("{not json", 400, None),
    ({"model": "tiny"}, 422, "prompt"),
    ({"model": "tiny", "prompt": "a", "max_tokens": "ten"}, 422, "max_tokens"),
    ({"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "tiny", "prompt": "a" * 250, "max_tokens": 10}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "a"}, 404, "model"),
    ({"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ({"model": "tiny", "prompt": [1, 2, 100000]}, 400, "prompt"),
])
def test_bad_requests_get_openai_errors_and_the_server_keeps_serving(server, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    resp = httpx.post(f"{server.url}/v1/completions", content=content, timeout=30,
                      headers={"content-type": "application/json"})
    assert resp.status_code == status, resp.text
    error = resp.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and error["param"] == param
    assert httpx.get(f"{server.url}/health", timeout=10).status_code == 200


def test_metrics_have_the_vllm_names(server, client):
    hits_before = metric(server, "prefix_cache_hits_total")
    client.completions.create(model="tiny", prompt="shared prefix " * 8 + "a", max_tokens=2)
    client.completions.create(model="tiny", prompt="shared prefix " * 8 + "b", max_tokens=2)
    text = httpx.get(f"{server.url}/metrics", timeout=10).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total", "request_success_total", "prefix_cache_queries_total",
                 "prefix_cache_hits_total", "time_to_first_token_seconds_bucket", "inter_token_latency_seconds_bucket",
                 "e2e_request_latency_seconds_bucket", "request_queue_time_seconds_bucket"):
        assert f"scaletrain:{name}{{" in text, name
    # The second prompt reused the first's 14 full blocks of 8 tokens.
    assert metric(server, "prefix_cache_hits_total") - hits_before >= 14 * 8
    assert 'finished_reason="length"' in text


def test_api_key_queue_limit_disconnect_and_graceful_sigterm(run_dir):
    srv = ServerProcess(str(run_dir), ["--api-key", "sekret", "--max-num-seqs", "1", "--max-queue", "1",
                                       "--served-model-name", "tiny"])
    try:
        url, auth = srv.url, {"Authorization": "Bearer sekret"}
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        denied = httpx.get(f"{url}/v1/models", timeout=10)
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models", headers={"Authorization": "Bearer wrong"}, timeout=10).status_code == 401
        # 16 choices one at a time (max-num-seqs 1): a request that runs for a while.
        long = {"model": "tiny", "prompt": "def ", "max_tokens": 250, "ignore_eos": True, "n": 16, "stream": True,
                "stream_options": {"include_usage": True}}
        results: dict[int, int] = {}

        def post(i):
            body = {"model": "tiny", "prompt": "x", "max_tokens": 5}
            results[i] = httpx.post(f"{url}/v1/completions", json=body, headers=auth, timeout=120)

        with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=auth, timeout=120) as running:
            lines = running.iter_lines()
            first_line = next(lines)
            others = [threading.Thread(target=post, args=(i,)) for i in range(4)]
            for t in others:
                t.start()
            for t in others:
                t.join(timeout=60)
            rest = list(lines)
        statuses = sorted(r.status_code for r in results.values())
        assert statuses.count(429) >= 2 and set(statuses) <= {200, 429}, (statuses, first_line)  # one may wait
        assert all(r.headers["retry-after"] == "1" for r in results.values() if r.status_code == 429)
        assert all(r.json()["error"]["code"] == "rate_limit_exceeded" for r in results.values() if r.status_code == 429)
        # A client that leaves mid-stream: its request is aborted and its blocks freed.
        with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=auth, timeout=120) as leaving:
            lines = leaving.iter_lines()  # kept: a dropped iterator closes the response
            next(lines)
            assert metric(srv, "num_requests_running", headers=auth) == 1
            assert metric(srv, "kv_cache_usage_perc", headers=auth) > 0
        deadline = time.monotonic() + 20
        while (metric(srv, "num_requests_running", headers=auth), metric(srv, "kv_cache_usage_perc", headers=auth)) != (0, 0):
            assert time.monotonic() < deadline, "the disconnected request still holds its blocks"
            time.sleep(0.05)
        assert metric(srv, "request_success_total", 'finished_reason="abort"', headers=auth) == 1
        # SIGTERM while a request streams: it still gets every token, then the server exits 0.
        with httpx.stream("POST", f"{url}/v1/completions", json=long, headers=auth, timeout=120) as in_flight:
            lines = in_flight.iter_lines()
            next(lines)
            srv.proc.send_signal(signal.SIGTERM)
            events = [line for line in lines if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        assert json.loads(events[-2][6:])["usage"]["completion_tokens"] == 16 * 250
        assert srv.stop() == 0, srv.output()
    finally:
        srv.kill()


def test_bad_model_paths_are_one_error_line(tmp_path, run_dir):
    (tmp_path / "mistral").mkdir()
    (tmp_path / "mistral" / "config.json").write_text(json.dumps({"model_type": "mistral"}))
    (tmp_path / "mistral" / "model.safetensors").write_bytes(b"")
    (tmp_path / "mistral" / "tokenizer.json").write_text("{}")
    for model in (tmp_path / "missing", run_dir / "config.toml", tmp_path, tmp_path / "mistral"):
        proc = run_cli(["serve", str(model), "--port", "1"], timeout=60)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr


def test_bench_serve_measures_a_running_server(server):
    proc = run_cli(["bench", "serve", "--url", server.url, "--concurrency", "1,2", "--num-prompts", "4",
                    "--max-tokens", "8", "--json"], timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = json.loads(proc.stdout)
    assert [r["concurrency"] for r in rows] == [1, 2]
    assert all(r["completed"] == 4 and r["failed"] == 0 and 4 <= r["output_tokens"] <= 32 for r in rows), rows
    assert all(r["output_tok_s"] > 0 and r["ttft_ms_p50"] > 0 for r in rows)
    refused = run_cli(["bench", "serve", "--url", "http://127.0.0.1:1"], timeout=60)
    assert refused.returncode == 2 and refused.stderr.startswith("error: --url")
