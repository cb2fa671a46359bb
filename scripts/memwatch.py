#!/usr/bin/env python3
"""Runs a command and samples its resident memory every 0.2 s; prints the RSS beside each line the
command writes to stderr (its logs), and the peak at the end.

usage: python3 scripts/memwatch.py <command> [args...]
"""
import subprocess
import sys
import threading
import time


def rss_gib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return 0.0


def main():
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    proc = subprocess.Popen(sys.argv[1:], stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    start = time.time()
    peak = [0.0]

    def sample():
        while proc.poll() is None:
            peak[0] = max(peak[0], rss_gib(proc.pid))
            time.sleep(0.2)

    threading.Thread(target=sample, daemon=True).start()
    for line in proc.stderr:
        for part in line.rstrip().split("\r"):
            if part.strip():
                now = rss_gib(proc.pid)
                print(f"{time.time() - start:7.1f}s rss {now:5.2f} GiB peak {peak[0]:5.2f} | {part[:160]}", flush=True)
    proc.wait()
    print(f"exit {proc.returncode}, {time.time() - start:.1f} s, peak {peak[0]:.2f} GiB")
    sys.exit(proc.returncode)


if __name__ == "__main__":
    main()
