#!/usr/bin/env python3
"""Benchmark `mwbuild build` against `tar --sort=name -cf - TREE | zstd -3 -T<cores>`.

For each tree (a generated one, and Debian's MediaWiki tree when available) it runs, side
by side in this one script:
  reference  tar --sort=name -cf - TREE | zstd -3 -T<cores> > /dev/null
  cold       mwbuild build with an empty cache and an empty output layout
  no-op      the same build again
  one-file   after changing one file
and prints times, ratios and mwbuild's peak RSS (from wait4). Each figure is the median of
--repeat runs. This is a benchmark, not a test: it never fails on a ratio.

usage: benches/build_bench.py [--size medium] [--debian DIR] [--repeat 3] [--work DIR]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, shell=False, env=None):
    """Run a command; return (seconds, peak RSS of the process tree's largest child in MiB)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, shell=shell, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    err = p.stderr.read().decode(errors="replace") if p.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {cmd}\n{err}")
    return dt, ru.ru_maxrss / 1024.0


def cargo_bin(name):
    subprocess.run(["cargo", "build", "--release", "-q", "-p", name], cwd=ROOT, check=True)
    return os.path.join(ROOT, "target", "release", name)


def tree_bytes(tree):
    n = files = 0
    for d, _, fs in os.walk(tree):
        for f in fs:
            p = os.path.join(d, f)
            if not os.path.islink(p):
                n += os.path.getsize(p)
                files += 1
    return n, files


def bench_tree(label, spec, tree, mwbuild, mwfixture, work, repeat, cores):
    size, files = tree_bytes(tree)
    print(f"\n== {label}: {tree} ({files} files, {size / 2**20:.0f} MiB), {cores} cores, median of {repeat}")
    # Warm the page cache so both sides read from memory.
    subprocess.run(f"tar -cf - -C '{tree}' . > /dev/null", shell=True, check=True)
    # The tree was just generated or copied: let mwbuild's racy-clean window (2 s) pass, as
    # it has for a staging tree between two builds, so the first rebuild is comparable.
    time.sleep(2.1)
    ref = f"tar --sort=name -cf - -C '{tree}' . | zstd -3 -T{cores} -q -c > /dev/null"
    out = os.path.join(work, "out")
    cache = os.path.join(work, "cache")
    build = [mwbuild, "build", spec, "--output", f"oci:{out}", "--cache-dir", cache, "--quiet"]
    refs, colds, noops, ones, rss = [], [], [], [], []
    for i in range(repeat):
        refs.append(run(ref, shell=True)[0])
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(cache, ignore_errors=True)
        t, m = run(build)
        colds.append(t); rss.append(m)
        # Let the racy-clean window pass, as it does between real builds.
        time.sleep(2.1)
        t, m = run(build)
        noops.append(t); rss.append(m)
        subprocess.run([mwfixture, "edit", tree, "--files", "1", "--seed", str(1000 + i)], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t, m = run(build)
        ones.append(t); rss.append(m)
    r, c, n, o = (statistics.median(x) for x in (refs, colds, noops, ones))
    print(f"{'run':<34}{'seconds':>9}{'ratio':>10}   target")
    print(f"{'tar --sort=name | zstd -3 -T' + str(cores):<34}{r:>9.2f}{1.0:>9.2f}x")
    print(f"{'mwbuild cold':<34}{c:>9.2f}{c / r:>9.2f}x   <= 1.00x of tar|zstd")
    print(f"{'mwbuild no-op rebuild':<34}{n:>9.2f}{n / c * 100:>8.1f}%   <= 3% of cold")
    print(f"{'mwbuild one-file change':<34}{o:>9.2f}{o / c * 100:>8.1f}%   <= 10% of cold")
    print(f"{'mwbuild peak RSS (MiB)':<34}{max(rss):>9.0f}{'':>10}   <= 512")
    return {"label": label, "files": files, "bytes": size, "tar_zstd": r, "cold": c, "noop": n, "one_file": o, "peak_rss_mib": max(rss)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium,large", help="generated tree sizes, comma-separated: tiny|small|medium|large")
    ap.add_argument("--debian", default=os.path.join(ROOT, "target", "debian-mediawiki"), help="Debian MediaWiki tree (fetched if missing)")
    ap.add_argument("--no-debian", action="store_true")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    cores = os.cpu_count() or 2
    mwbuild, mwfixture = cargo_bin("mwbuild"), cargo_bin("mwfixture")
    work = a.work or tempfile.mkdtemp(prefix="mwbuild-bench-")
    results = []

    for size in a.size.split(","):
        gen = os.path.join(work, "gen-" + size)
        shutil.rmtree(gen, ignore_errors=True)
        subprocess.run([mwfixture, "train", "--out", gen, "--size", size, "--versions", "1", "--seed", "42"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        spec = os.path.join(gen, "mwbuild.toml")
        text = open(spec).read()
        tree = [l.split('"')[1] for l in text.splitlines() if l.startswith('source = "versions/')][0]
        # Bench only the version tree: drop shared trees so both sides read the same bytes.
        text = text.split("[[shared]]")[0] + "[[versions]]" + text.split("[[versions]]", 1)[1]
        bspec = os.path.join(gen, "bench.toml")
        open(bspec, "w").write(text.replace('image = "oci:base:latest"', 'image = "scratch"'))
        results.append(bench_tree(f"generated ({size})", bspec, os.path.join(gen, tree), mwbuild, mwfixture, os.path.join(work, "w-" + size), a.repeat, cores))

    if not a.no_debian:
        deb = a.debian
        if not os.path.isdir(deb):
            subprocess.run(["bash", os.path.join(ROOT, "fixtures", "fetch-debian-mediawiki.sh"), deb], check=True)
        # Work on a copy: the one-file step edits the tree.
        copy = os.path.join(work, "debian-tree")
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(deb, copy, symlinks=True)
        dspec = os.path.join(work, "debian.toml")
        with open(dspec, "w") as f:
            f.write('[base]\nimage = "scratch"\n[[versions]]\nname = "debian"\nsource = "%s"\n'
                    '[layers]\nexclude = [".git", "cache/l10n/upstream"]\n'
                    'split = [{ path = "includes" }, { path = "vendor" }, { path = "extensions-core", bins = 4 }, { path = "skins" }, { path = "languages", bins = 4 }, { path = "resources" }]\n'
                    '[ownership]\nsymlinks = "any"\n' % copy)
        results.append(bench_tree("Debian mediawiki", dspec, copy, mwbuild, mwfixture, os.path.join(work, "w2"), a.repeat, cores))

    if a.json:
        json.dump(results, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
