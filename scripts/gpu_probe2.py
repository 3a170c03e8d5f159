"""Probe TE intra-node NVLink behaviour for regions registered after the peer opened our segment."""

import ctypes
import multiprocessing as mp
import os
import time

import torch


def te_init():
    os.environ["MC_INTRANODE_NVLINK"] = "1"
    from mooncake.engine import TransferEngine

    te = TransferEngine()
    assert te.initialize("127.0.0.1", "P2PHANDSHAKE", "tcp", "") == 0
    return te


def sync_cache(te):
    lib = ctypes.CDLL(os.path.join(os.path.dirname(__import__("mooncake").__file__), "engine.so"))
    # mooncake::TransferEngine::syncSegmentCache(const std::string&)
    fn = lib["_ZN8mooncake14TransferEngine16syncSegmentCache"
             "ERKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEE"]
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    s = (ctypes.c_char * 32)()
    base = ctypes.addressof(s)
    ctypes.c_size_t.from_address(base).value = base + 16
    ctypes.c_size_t.from_address(base + 8).value = 0
    return fn(te.get_engine_ptr(), base)


def recv(q, a):
    te = te_init()
    port = te.get_rpc_port()
    b1 = torch.zeros(1 << 20, dtype=torch.uint8, device="cuda")
    print("reg b1", te.register_memory(b1.data_ptr(), b1.numel(), "*"), flush=True)
    q.put((port, b1.data_ptr()))
    a.get()
    print("b1 sum", int(b1.sum()), flush=True)
    b2 = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    print("reg b2", te.register_memory(b2.data_ptr(), b2.numel(), "*"), flush=True)
    q.put(b2.data_ptr())
    a.get()
    print("b2 sum after writes", int(b2[: 1 << 20].sum()), flush=True)
    p2 = b2.data_ptr()
    del b2
    torch.cuda.empty_cache()
    b3 = torch.zeros(64 << 20, dtype=torch.uint8, device="cuda")
    print("b3 same addr as b2:", b3.data_ptr() == p2, flush=True)
    print(
        "unreg old",
        te.unregister_memory(p2),
        "reg b3",
        te.register_memory(b3.data_ptr(), b3.numel(), "*"),
        flush=True,
    )
    q.put(b3.data_ptr())
    a.get()
    print(
        "b3 sum (want >0 if a write landed)",
        int(b3[: 1 << 20].sum()),
        int(b3[1 << 20 : 2 << 20].sum()),
        flush=True,
    )
    q.put("bye")


def send(q, a):
    te = te_init()
    port, p1 = q.get()
    seg = f"127.0.0.1:{port}"
    src = torch.ones(1 << 20, dtype=torch.uint8, device="cuda")
    te.register_memory(src.data_ptr(), src.numel(), "*")
    print("write b1", te.transfer_sync_write(seg, src.data_ptr(), p1, 1 << 20), flush=True)
    a.put(1)
    p2 = q.get()
    print("write b2 plain", te.transfer_sync_write(seg, src.data_ptr(), p2, 1 << 20), flush=True)
    t = time.perf_counter()
    rc = sync_cache(te)
    print("syncSegmentCache rc", rc, (time.perf_counter() - t) * 1e6, "us", flush=True)
    print("write b2 after sync", te.transfer_sync_write(seg, src.data_ptr(), p2, 1 << 20), flush=True)
    alias = f"127.0.0.1:0{port}"
    t = time.perf_counter()
    rc = te.transfer_sync_write(alias, src.data_ptr(), p2, 1 << 20)
    print("write b2 via alias", rc, (time.perf_counter() - t) * 1e6, "us", flush=True)
    print(
        "REOPEN: write b1 (opened via seg) via alias",
        te.transfer_sync_write(alias, src.data_ptr(), p1, 1 << 20),
        flush=True,
    )
    print(
        "REOPEN: write b1 via alias 000",
        te.transfer_sync_write(f"127.0.0.1:000{port}", src.data_ptr(), p1, 1 << 20),
        flush=True,
    )
    a.put(1)
    p3 = q.get()
    print("same addr", p3 == p2, flush=True)
    rc = sync_cache(te)
    print("sync", rc, flush=True)
    print("write b3 via seg after sync", te.transfer_sync_write(seg, src.data_ptr(), p3, 1 << 20), flush=True)
    alias2 = f"127.0.0.1:00{port}"
    print(
        "write b3 via new alias (second MiB)",
        te.transfer_sync_write(alias2, src.data_ptr(), p3 + (1 << 20), 1 << 20),
        flush=True,
    )
    a.put(1)
    q.get()


if __name__ == "__main__":
    mp.set_start_method("spawn")
    q1, q2 = mp.Queue(), mp.Queue()

    class Dup:
        pass

    r = mp.Process(target=recv, args=(q1, q2))
    s = mp.Process(target=send, args=(q1, q2))
    # recv puts into q1; send reads q1; send puts acks into q2
    r.start()
    s.start()
    s.join(120)
    r.join(30)
    print("exit", r.exitcode, s.exitcode)
