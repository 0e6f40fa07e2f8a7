"""A scripted candidate with LocalCandidate's interface, for fast bench tests."""

from __future__ import annotations

from rung.bench.records import CandidateInfo, Sample


class Scripted:
    """Answers each case from ``answers`` (case id → text, a list of texts for its samples, or a
    function of the request); counts every request it is asked to generate."""

    def __init__(self, name: str, answers: dict, params: int = 100_000_000, weight_bytes: int | None = None,
                 peak: int = 500 * 10**6, kind: str = "local", ttft_s: float = 0.05, latency_s: float = 0.5,
                 perplexity: float | None = 10.0, license: str = "apache-2.0", max_context: int = 8192,
                 fail_open: str | None = None, host: str | None = None, kv_per_token: float = 10_000,
                 load_peak: int | None = None):
        self.name, self.answers, self.kind = name, answers, kind
        self.generated = 0  # requests asked for
        self.opened = 0
        self.ttft_s, self.latency_s, self._ppl, self.fail_open = ttft_s, latency_s, perplexity, fail_open
        self.info = CandidateInfo(name=name, kind=kind, total_params=params,
                                  weight_bytes=weight_bytes if weight_bytes is not None or params is None else params * 2,
                                  peak_memory_bytes=peak if kind == "local" else None, max_context=max_context,
                                  kv_bytes_per_token=kv_per_token if kind == "local" else None, license=license,
                                  host=host, load_peak_bytes=load_peak)
        self.requests = []

    def fingerprint(self) -> dict:
        return {"spec": self.name}

    def open(self) -> CandidateInfo:
        self.opened += 1
        if self.fail_open:
            raise RuntimeError(self.fail_open)
        return self.info

    def generate(self, requests, concurrency, on_done=None) -> float:
        for i, req in enumerate(requests):
            self.generated += 1
            self.requests.append(req)
            answer = self.answers.get(req.case_id, "")
            if callable(answer):
                answer = answer(req)
            texts = answer if isinstance(answer, list) else [answer] * req.n
            samples = []
            for text in texts[:req.n]:
                calls = None
                if isinstance(text, dict):  # a structured tool call, as an API returns it
                    calls, text = [text], ""
                samples.append(Sample(text=text, tool_calls=calls, prompt_tokens=10 + i, output_tokens=8,
                                      ttft_s=self.ttft_s, latency_s=self.latency_s, finish_reason="stop"))
            if on_done:
                on_done(i, samples)
        return max(0.1, len(requests) * self.latency_s / max(1, concurrency))

    def perplexity(self, text):
        return (self._ppl, "") if self._ppl is not None else (None, "no logprobs here")

    def measure_memory(self) -> None:
        pass

    def close(self) -> None:
        pass
