#!/usr/bin/env python3
"""Benchmark `scap-bridge prep` against the reference tools, side by side in one run.

On a generated MediaWiki-shaped version tree built into images by mwbuild (one zstd image,
one gzip image, scratch base, the version's layers only), for each of --repeat rounds:

  reference   for each layer: zstd -dc LAYER | tar -x -C DIR          (zstd image)
  cold        scap-bridge prep --manage-scap-regions into an empty staging (same bytes as
              the reference; full verification: digests, sizes, DiffIDs, TOCs)
  cold/regions scap-bridge prep with scap's regions left alone (the default: the image's
              cache/l10n/*.cdb are not written)
  re-prep     the same prep again (must write 0 bytes); it and the update are compared with
              the faster of the two cold preps (the one with regions skipped runs right
              after the removal of a whole tree, and ext4's inode allocator then spends
              seconds skipping the recently deleted inodes while the tree is created)
  update      after `mwfixture edit` of K files and an mwbuild rebuild: prep of the new image
              (bytes written vs bytes of the changed files)
  umoci       umoci raw unpack of the gzip image, vs scap-bridge unpack of the same image

It prints medians, ratios against the targets of the issue, and scap-bridge's peak RSS
(from wait4). A benchmark, not a test: it never fails on a ratio.

usage: benches/prep_bench.py [--size medium] [--repeat 3] [--k 10] [--work DIR]
"""
import argparse, json, os, shutil, statistics, subprocess, sys, tempfile, time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(cmd, shell=False):
    """Run a command; return (seconds, peak RSS in MiB, stdout). Dirty pages of earlier
    steps are flushed first so that their writeback is not charged to this one."""
    os.sync()
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, shell=shell, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out = p.stdout.read()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        sys.exit(f"command failed: {cmd}\n{p.stderr.read().decode(errors='replace')}")
    return dt, ru.ru_maxrss / 1024.0, out.decode(errors="replace")


def cargo_bins(*names):
    args = ["cargo", "build", "--release", "-q"]
    for n in names:
        args += ["-p", n]
    subprocess.run(args, cwd=ROOT, check=True)
    return [os.path.join(ROOT, "target", "release", n) for n in names]


def layers_of(layout, tag):
    index = json.load(open(os.path.join(layout, "index.json")))
    d = [m["digest"] for m in index["manifests"] if m.get("annotations", {}).get("org.opencontainers.image.ref.name") == tag][0]
    manifest = json.load(open(os.path.join(layout, "blobs", "sha256", d.split(":")[1])))
    return [os.path.join(layout, "blobs", "sha256", l["digest"].split(":")[1]) for l in manifest["layers"]]


def fresh(*dirs):
    for d in dirs:
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="medium", help="tiny|small|medium|large")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--k", type=int, default=10, help="files changed for the update step")
    ap.add_argument("--work", default=None)
    ap.add_argument("--json", default=None, help="write the figures here")
    a = ap.parse_args()
    bridge, mwbuild, mwfixture = cargo_bins("scap-bridge", "mwbuild", "mwfixture")
    have_umoci = shutil.which("umoci") is not None
    work = a.work or tempfile.mkdtemp(prefix="scap-bridge-bench-")
    gen = os.path.join(work, "gen")
    shutil.rmtree(gen, ignore_errors=True)
    subprocess.run([mwfixture, "train", "--out", gen, "--size", a.size, "--versions", "1", "--seed", "42"], check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    text = open(os.path.join(gen, "mwbuild.toml")).read()
    version = sorted(os.listdir(os.path.join(gen, "versions")))[0]
    tree = os.path.join(gen, "versions", version)
    text = text.split("[[shared]]")[0] + "[[versions]]" + text.split("[[versions]]", 1)[1]
    text = text.replace('image = "oci:base:latest"', 'image = "scratch"')
    specs = {}
    for alg in ("zstd", "gzip"):
        specs[alg] = os.path.join(gen, f"bench-{alg}.toml")
        open(specs[alg], "w").write(text.replace('algorithm = "zstd"', f'algorithm = "{alg}"'))
    layouts = {alg: os.path.join(work, f"img-{alg}") for alg in specs}
    cache = os.path.join(work, "cache")

    def build(alg):
        subprocess.run([mwbuild, "build", specs[alg], "--output", f"oci:{layouts[alg]}", "--cache-dir", cache + "-" + alg, "--quiet"], check=True, stdout=subprocess.DEVNULL)

    for alg in specs:
        build(alg)
    zimg, gimg = f"oci:{layouts['zstd']}:{version}", f"oci:{layouts['gzip']}:{version}"
    subprocess.run(f"cat '{layouts['zstd']}'/blobs/sha256/* '{layouts['gzip']}'/blobs/sha256/* > /dev/null", shell=True, check=True)
    staging, state, ref = (os.path.join(work, n) for n in ("staging", "state", "ref"))

    def prep(image, *extra):
        cmd = [bridge, "prep", image, "--version", version, "--staging-dir", staging, "--state-dir", state, "--lock-file", os.path.join(work, "lock"), "--json", *extra]
        t, m, out = run(cmd)
        return t, m, json.loads(out)

    fig = {k: [] for k in ("ref", "cold", "cold_regions", "reprep", "update", "umoci", "unpack")}
    rss, reprep_bytes, upd = [], [], []
    zlayers = layers_of(layouts["zstd"], version)
    for i in range(a.repeat):
        fresh(ref)
        cmd = "; ".join(f"zstd -dc '{l}' | tar -x -C '{ref}'" for l in zlayers)
        fig["ref"].append(run(cmd, shell=True)[0])
        fresh(staging, state)
        t, m, s = prep(zimg, "--manage-scap-regions")
        fig["cold"].append(t); rss.append(m)
        fresh(staging, state)
        t, m, s = prep(zimg)
        fig["cold_regions"].append(t); rss.append(m)
        t, m, s = prep(zimg)
        fig["reprep"].append(t); rss.append(m); reprep_bytes.append(s["bytes_written"])
        edited = subprocess.run([mwfixture, "edit", tree, "--files", str(a.k), "--seed", str(100 + i)], check=True, capture_output=True, text=True).stdout.split()
        changed = sum(os.path.getsize(os.path.join(tree, p)) for p in edited)
        build("zstd")
        t, m, s = prep(zimg)
        prov = os.path.getsize(os.path.join(staging, f"php-{version}", ".scap-bridge-provenance.json"))
        fig["update"].append(t); rss.append(m); upd.append((s["bytes_written"] - prov, changed, s["changed"]))
        if have_umoci:
            u = os.path.join(work, "umoci")
            shutil.rmtree(u, ignore_errors=True)
            fig["umoci"].append(run(["umoci", "raw", "unpack", "--image", gimg.removeprefix("oci:"), u])[0])
            o = os.path.join(work, "unpacked")
            shutil.rmtree(o, ignore_errors=True)
            t, m, _ = run([bridge, "unpack", gimg, o, "--state-dir", os.path.join(work, "state-unpack"), "-q"])
            shutil.rmtree(os.path.join(work, "state-unpack"), ignore_errors=True)
            fig["unpack"].append(t); rss.append(m)
    med = {k: statistics.median(v) for k, v in fig.items() if v}
    files = sum(len(fs) for _, _, fs in os.walk(tree))
    print(f"\n== {a.size} tree: {files} files, {version}; median of {a.repeat}; {os.cpu_count()} cores")
    print(f"{'run':<44}{'seconds':>9}{'ratio':>10}   target")
    r, c = med["ref"], med["cold"]
    print(f"{'zstd -dc LAYER | tar -x (each layer)':<44}{r:>9.2f}{1.0:>9.2f}x")
    print(f"{'prep cold (--manage-scap-regions)':<44}{c:>9.2f}{c / r:>9.2f}x   <= 1.00x of zstd|tar")
    print(f"{'prep cold (default: scap regions skipped)':<44}{med['cold_regions']:>9.2f}{med['cold_regions'] / r:>9.2f}x")
    base = min(c, med["cold_regions"])
    print(f"{'re-prep, same image':<44}{med['reprep']:>9.3f}{med['reprep'] / base * 100:>8.1f}%   <= 5% of cold, 0 bytes (wrote {max(reprep_bytes)})")
    wrote, changed, n = upd[-1]
    print(f"{'update, ' + str(a.k) + ' files changed':<44}{med['update']:>9.2f}{med['update'] / base * 100:>8.1f}%   wrote {wrote} B (+ provenance) for {changed} B changed: {wrote / max(changed, 1):.3f}x, target <= 1.05x")
    if have_umoci:
        print(f"{'umoci raw unpack (gzip image)':<44}{med['umoci']:>9.2f}")
        print(f"{'scap-bridge unpack (gzip image)':<44}{med['unpack']:>9.2f}{med['umoci'] / med['unpack']:>9.2f}x faster   >= 3x")
    print(f"{'scap-bridge peak RSS (MiB)':<44}{max(rss):>9.0f}{'':>10}   <= 256")
    if a.json:
        json.dump({"median_seconds": med, "peak_rss_mib": max(rss), "update": upd, "reprep_bytes": reprep_bytes}, open(a.json, "w"), indent=2)


if __name__ == "__main__":
    main()
