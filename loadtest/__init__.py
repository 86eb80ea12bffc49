"""duoserve.loadtest: load tests and benchmarks of OpenAI-compatible endpoints, over HTTP only.

- locustfile.py: the locust file (web UI or headless) with TTFT/TPOT/ITL/E2E/tokens-per-second events.
- cli.py: `duoserve bench` / `python -m duoserve.loadtest`: dense vs dual-sparse sweep and report.
- client.py, metrics.py, prompts.py, quality.py, report.py, runner.py, servers.py: the parts.
See docs/loadtest.md.
"""
