"""Load on `serve`: requests/s and p50/p95 latency for 1, 4 and 16 concurrent clients of 10 photos each, over
loopback, beside two baselines measured in the same run: the scorer called in-process (no HTTP, no upload
parsing) and `query` on the same 10 photos with the model already loaded (what a user without the server
runs per person).

    python -m idia_engine.benchmarks.serve_load --demo idia-demo --out benchmarks/results/<folder>

`--demo` is a workdir `idia-engine demo` wrote (its index, report and held-out faces). Every client sends a
bounded number of requests (`--requests` in all per concurrency level); every answer must equal the
in-process one for the same person (checked). Writes serve_load.json with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..engine.query.run import QueryConfig, run_query
from ..engine.serve.photos import decode_uploads
from ..engine.serve.server import bind, load
from ..engine.serve.settings import ServeSettings
from ..engine.serve.upload import UploadedFile
from .run import machine_info

PHOTOS = 10


def _people(demo: Path, count: int) -> dict[str, list[Path]]:
    folders = sorted(p for p in (demo / "faces").iterdir() if p.is_dir())[:count]
    return {f.name.replace("_", " "): sorted(f.iterdir())[:PHOTOS] for f in folders}


def _latencies(seconds: list[float], wall: float) -> dict:
    ms = np.array(seconds) * 1000
    return {"requests": len(seconds), "wall_s": round(wall, 3), "requests_per_s": round(len(seconds) / wall, 2),
            "p50_ms": round(float(np.percentile(ms, 50)), 1), "p95_ms": round(float(np.percentile(ms, 95)), 1)}


def run(demo: Path, out: Path, requests: int, people_count: int) -> dict:
    import httpx
    import uvicorn

    settings = ServeSettings(index_dir=demo / "index", device="cpu")
    loaded = load(settings)
    people = _people(demo, people_count)
    files = {p: [UploadedFile(x.name, "image/png", x.read_bytes()) for x in paths] for p, paths in people.items()}
    names = list(people)

    # Baseline 1: the scorer in-process (decode + encode + search + vote), one request at a time.
    expected, in_process = {}, []
    for i in range(requests):
        person = names[i % len(names)]
        t0 = time.perf_counter()
        photos, _ = decode_uploads(files[person], settings.max_pixels)
        result = loaded.scorer.score(person, photos)
        in_process.append(time.perf_counter() - t0)
        expected[person] = (result.score, result.votes.true_votes.tolist())
    t_in = sum(in_process)

    # Baseline 2: `query` over a faces folder of the same photos, model loaded once.
    query_s = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, person in enumerate(names[:3]):
            faces = Path(tmp) / f"faces-{i}"
            (faces / person.replace(" ", "_")).mkdir(parents=True)
            for p in people[person]:
                (faces / person.replace(" ", "_") / p.name).write_bytes(p.read_bytes())
            t0 = time.perf_counter()
            run_query(QueryConfig(index_dir=demo / "index", faces_dir=faces, out_dir=Path(tmp) / f"report-{i}",
                                  store_dir=Path(tmp) / f"store-{i}", device="cpu"), model=loaded.scorer.model)
            query_s.append(time.perf_counter() - t0)

    sock = bind("127.0.0.1", 0)
    base = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(loaded.app(settings), log_level="warning", access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if server.started:
            break
        time.sleep(0.05)
    levels = {}
    try:
        for clients in (1, 4, 16):
            seconds: list[float] = []
            lock = threading.Lock()

            def client(c: int) -> None:
                with httpx.Client(base_url=base, timeout=300) as http:
                    for j in range(c, requests, clients):  # bounded: `requests` in all per level
                        person = names[j % len(names)]
                        body = [("photos", (f.filename, f.data, f.content_type)) for f in files[person]]
                        t0 = time.perf_counter()
                        r = http.post("/api/attack", data={"name": person}, files=body)
                        dt = time.perf_counter() - t0
                        a = r.json()
                        got = (a["score"], [[t["votes_for_name"] for t in a["templates"]]])
                        if r.status_code != 200 or got != expected[person]:
                            raise AssertionError(f"answer for {person} differs from the in-process one: {a}")
                        with lock:
                            seconds.append(dt)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                list(pool.map(client, range(clients)))
            levels[str(clients)] = _latencies(seconds, time.perf_counter() - t0)
            levels[str(clients)]["x_in_process"] = round(levels[str(clients)]["requests_per_s"] * t_in / requests, 3)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        loaded.scorer.close()
    results = {
        "index": {"names": len(loaded.scorer.index.names), "templates": len(loaded.scorer.templates),
                  "kind": loaded.scorer.index.manifest.index_kind},
        "photos_per_request": PHOTOS, "requests_per_level": requests, "people": len(names),
        "baseline_in_process": _latencies(in_process, t_in),
        "baseline_query_per_person_s": {"runs": len(query_s), "median": round(float(np.median(query_s)), 3)},
        "clients": levels, "answers_equal_in_process": True, "machine": machine_info(),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_load.json").write_text(json.dumps(results, indent=1) + "\n", encoding="utf-8")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--demo", type=Path, default=Path("idia-demo"), help="a workdir `idia-engine demo` wrote")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--requests", type=int, default=48, help="requests per concurrency level")
    parser.add_argument("--people", type=int, default=8)
    args = parser.parse_args()
    print(json.dumps(run(args.demo, args.out, args.requests, args.people), indent=1))


if __name__ == "__main__":
    main()
