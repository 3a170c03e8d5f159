"""Exploratory GPU probe (two processes on one GPU): transports, correctness, raw vs ours."""
import asyncio, os, sys, time, statistics, multiprocessing as mp
import torch
import aiomooncake as am
from aiomooncake import _trace
from aiomooncake.engine import Engine

N = 100_000_000

def server(q, rq):
    async def main():
        lst = await am.listen("127.0.0.1", 0)
        q.put(lst.port)
        peer = await lst.accept()
        rq.put(("server transports", peer.transports))
        buf = torch.empty(N, dtype=torch.uint8, device="cuda")
        eng = peer._links["cuda"].engine
        eng.acquire(buf)
        await peer.send(torch.tensor([buf.data_ptr()]), tag=100)
        for i in range(15):
            await peer.recv(buf, tag=1)
        rq.put(("server got", int(buf[:1000].sum()), int(buf[-1000:].sum())))
        rq.put(("TRACE-S", _trace.take()))
        # new allocations after the segment was opened by the sender
        for k in range(3):
            x = torch.empty(50_000_000 + k * 4096, dtype=torch.uint8, device="cuda")
            await peer.recv(x, tag=2)
            rq.put(("new buffer", k, int(x.float().sum().item())))
        # stale: free a registered segment, reallocate at the same address, receive again
        y = torch.empty(64 << 20, dtype=torch.uint8, device="cuda"); p0 = y.data_ptr()
        await peer.recv(y, tag=5)
        rq.put(("stale-1", int(y[:4096].float().sum().item())))
        del y; torch.cuda.empty_cache()
        y = torch.empty(64 << 20, dtype=torch.uint8, device="cuda")
        rq.put(("stale same address", y.data_ptr() == p0))
        await peer.recv(y, tag=5)
        rq.put(("stale-2 (want 8192)", int(y[:4096].float().sum().item()), eng.stats()))
        # small latency
        s = torch.empty(1024, dtype=torch.float32, device="cuda")
        for i in range(200):
            await peer.recv(s, tag=3)
        await peer.send(s, tag=4)
        await peer.close(); await lst.close()
    am.run(main())

def client(port, rq):
    async def main():
        peer = await am.connect("127.0.0.1", port)
        rq.put(("client transports", peer.transports))
        src = torch.full((N,), 7, dtype=torch.uint8, device="cuda")
        addr = torch.empty(1, dtype=torch.int64); await peer.recv(addr, tag=100)
        link = peer._links["cuda"]; eng = link.engine; eng.acquire(src)
        torch.cuda.synchronize()
        raw, ours = [], []
        for i in range(12):
            t = time.perf_counter(); rc = eng.write_sync(link.remote_segment, src.data_ptr(), int(addr[0]), N); raw.append(time.perf_counter() - t)
            t = time.perf_counter(); await peer.send(src, tag=1); ours.append(time.perf_counter() - t)
        import aiomooncake.engine as E
        marks = []
        orig_write = E.Engine.write
        def write(self, *a, **k):
            marks.append(("write-called", time.perf_counter()))
            job = orig_write(self, *a, **k)
            job.future.add_done_callback(lambda f: marks.append(("write-done", time.perf_counter())))
            return job
        E.Engine.write = write
        _trace.take()
        for i in range(3):
            t0 = time.perf_counter(); await peer.send(src, tag=1); t1 = time.perf_counter()
            if i == 2: rq.put(("TRACE-C", _trace.take(), t0))
            rq.put(("breakdown us", [(m, round((t - t0) * 1e6)) for m, t in marks], "total", round((t1 - t0) * 1e6)))
            marks.clear()
        E.Engine.write = orig_write
        r, o = statistics.median(raw[2:]), statistics.median(ours[2:])
        rq.put(("100MB raw GB/s", N / r / 1e9, "ours GB/s", N / o / 1e9, "ratio", r / o, "rc", rc))
        for k in range(3):
            x = torch.full((50_000_000 + k * 4096,), 1, dtype=torch.uint8, device="cuda")
            try:
                await peer.send(x, tag=2)
            except Exception as e:
                rq.put(("new buffer send failed", k, repr(e)))
        await peer.send(torch.full((64 << 20,), 1, dtype=torch.uint8, device="cuda"), tag=5)
        await peer.send(torch.full((64 << 20,), 2, dtype=torch.uint8, device="cuda"), tag=5)
        s = torch.ones(1024, dtype=torch.float32, device="cuda")
        ts = []
        for i in range(200):
            _trace.take(); t = time.perf_counter(); await peer.send(s, tag=3); ts.append(time.perf_counter() - t)
            if i == 100: rq.put(("4K", [(n, round((x - t) * 1e6)) for n, x in _trace.take()]))
        rq.put(("4KiB send us", statistics.median(ts) * 1e6))
        await peer.recv(s, tag=4)
        # raw 64 B
        ts = []
        for i in range(50):
            t = time.perf_counter(); eng.write_sync(link.remote_segment, src.data_ptr(), int(addr[0]), 64); ts.append(time.perf_counter() - t)
        rq.put(("raw 64B us", statistics.median(ts) * 1e6))
        a = torch.empty(N, dtype=torch.uint8, device="cuda"); b = torch.empty_like(a)
        ts = []
        for i in range(10):
            e0 = torch.cuda.Event(enable_timing=True); e1 = torch.cuda.Event(enable_timing=True)
            e0.record(); b.copy_(a); e1.record(); e1.synchronize(); ts.append(e0.elapsed_time(e1) / 1e3)
        rq.put(("d2d copy GB/s", N / statistics.median(ts) / 1e9))
        print(eng.stats(), flush=True)
        await peer.close()
    am.run(main())

if __name__ == "__main__":
    mp.set_start_method("spawn")
    q, rq = mp.Queue(), mp.Queue()
    s = mp.Process(target=server, args=(q, rq)); s.start()
    port = q.get(timeout=120)
    c = mp.Process(target=client, args=(port, rq)); c.start()
    c.join(240); s.join(30)
    for p in (s, c):
        if p.is_alive(): p.kill()
    tr = {}
    import queue
    while True:
        try:
            item = rq.get(timeout=2)
        except queue.Empty:
            break
        if str(item[0]).startswith("TRACE"):
            tr[item[0]] = item[1:]
            continue
        print(*item)
    if len(tr) == 2:
        cmarks, t0 = tr["TRACE-C"]
        smarks = [m for m in tr["TRACE-S"][0] if m[1] >= t0 - 1e-3]
        allm = sorted([("C " + n, t) for n, t in cmarks] + [("S " + n, t) for n, t in smarks], key=lambda x: x[1])
        for n, t in allm:
            print(f"TL {(t - t0) * 1e6:9.1f} us  {n}")
    print("exit", s.exitcode, c.exitcode)
