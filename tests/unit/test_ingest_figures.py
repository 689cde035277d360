"""The figures benchmarks/ingest.py derives: the ordered bound at 1 association and its ratios, the
disk's cache flushes per image, the filesystem line, and edged's time per step from its metrics (< 1 s).

The benchmark itself needs DCMTK and minutes; these check its arithmetic on made-up throughput figures and
per-file flush timings, and run its disk+journal loop on three tiny files.
"""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
import ingest  # noqa: E402
from ingest import FileTimes, Results, Throughput  # noqa: E402


def _results(*throughput: Throughput) -> Results:
    r = Results(count=100, file_bytes=51_300_000, cpu_count=2, dcmtk="3.6.7", workdir_fs="ext4 (/)", repeat=2)
    for t in throughput:
        r.add(t)
    return r


def _ips(receiver: str, images_per_s: float, associations: int = 1, per_file: FileTimes | None = None) -> Throughput:
    """``receiver`` at ``images_per_s`` for 100 images."""
    return Throughput(receiver, associations, 100, 100 / images_per_s, 51.3, per_file=per_file)


# 100 files: (a) 0.5 ms, (b) 1.5 ms, (c) 0.5 ms each, so the flushes take 2 ms per file
FLUSHES_2MS = FileTimes(files=100, write_s=0.05, flush_s=0.15, commit_s=0.05)


def _standard() -> Results:
    return _results(_ips("storescp", 500.0), _ips("disk limit", 400.0), _ips("edged", 200.0),
                    _ips("disk+journal", 150.0, per_file=FLUSHES_2MS))


def test_bound_is_storescp_time_plus_the_flushes_not_the_page_cache_write() -> None:
    b = ingest.ordered_bound(_standard())
    assert b is not None
    assert b.storescp_ms == pytest.approx(2.0)
    assert b.flush_ms == pytest.approx(1.5)
    assert b.commit_ms == pytest.approx(0.5)
    assert b.images_per_s == pytest.approx(250.0)  # 1 / (2 ms + 2 ms); with (a) counted too it would be 222
    assert b.over_disk_limit == pytest.approx(0.625)
    assert b.edged_over_bound == pytest.approx(0.8)
    assert b.target_over_bound == pytest.approx(0.6 * 400 / 250)


def test_bound_in_json() -> None:
    out = ingest.to_json(_standard())["ordered_bound_1"]
    assert out["images_per_s"] == pytest.approx(250.0)
    assert out["over_disk_limit"] == pytest.approx(0.625)
    assert out["edged_over_bound"] == pytest.approx(0.8)
    assert out["flush_ms"] == {"fsync_rename_dirfsync": pytest.approx(1.5), "journal_commit": pytest.approx(0.5),
                               "total": pytest.approx(2.0)}


def test_bound_uses_the_best_rounds() -> None:
    r = _results(_ips("storescp", 250.0), _ips("storescp", 500.0), _ips("storescp", 400.0),
                 _ips("disk limit", 400.0),
                 _ips("disk+journal", 100.0, per_file=FileTimes(100, 0.05, 0.55, 0.05)),  # a slow round: 6 ms
                 _ips("disk+journal", 150.0, per_file=FLUSHES_2MS),
                 _ips("disk+journal", 120.0, per_file=FileTimes(100, 0.05, 0.25, 0.05)))
    b = ingest.ordered_bound(r)
    assert b is not None
    assert b.images_per_s == pytest.approx(250.0)
    assert b.edged is None and b.edged_over_bound is None
    assert ingest.to_json(r)["ordered_bound_1"]["edged_over_bound"] is None


def test_bound_only_at_one_association() -> None:
    r = _results(_ips("storescp", 500.0, 4), _ips("disk limit", 400.0, 4), _ips("edged", 200.0, 4),
                 _ips("disk+journal", 150.0, 4, per_file=FLUSHES_2MS))
    assert ingest.ordered_bound(r) is None
    assert "ordered_bound_1" not in ingest.to_json(r)


def test_no_bound_without_storescp() -> None:
    r = _results(_ips("disk limit", 400.0), _ips("edged", 200.0), _ips("disk+journal", 150.0, per_file=FLUSHES_2MS))
    assert ingest.ordered_bound(r) is None
    assert "ordered_bound_1" not in ingest.to_json(r)
    text = ingest.report(r)
    assert "ordered bound, 1 association" in text
    assert "n/a (needs storescp and disk measured at 1 association)" in text
    assert "(a) open+write 0.500, (b) fsync+rename+dir fsync 1.500, (c) journal commit 0.500" in text


def test_no_bound_without_the_disk_loops() -> None:
    r = _results(_ips("storescp", 500.0), _ips("edged", 200.0))
    assert ingest.ordered_bound(r) is None
    assert "n/a (needs storescp and disk measured at 1 association)" in ingest.report(r)


def test_report_block() -> None:
    text = ingest.report(_standard())
    block = text[text.index("ordered bound, 1 association"):]
    assert text.index("edged/disk-limit") < text.index("ordered bound")  # after the ratio table
    assert ("storescp's 2.00 ms per image + flushes 2.00 ms (fsync+rename+dir fsync 1.50, journal commit 0.50) "
            "= 4.00 ms -> 250.0 images/s") in block
    assert "bound/disk-limit 0.62x   edged/bound 0.80x   target 0.6x disk-limit = 0.96x the bound" in block
    assert "disk+journal loop, 1 thread, mean ms per file: (a) open+write 0.500" in block
    assert "disk+journal " in text[:text.index("ordered bound")]  # its row in the throughput table


def test_disk_limit_figure_is_unchanged_by_the_journal_pass() -> None:
    """The "disk limit" row is its own loop's wall clock; the disk+journal pass is a row of its own."""
    r = _standard()
    assert r.get("disk limit", 1).images_per_s == pytest.approx(400.0)  # type: ignore[union-attr]
    assert ingest.ratios(r)[0]["edged_over_disk_limit"] == pytest.approx(0.5)


def _tiny_files(tmp_path: Path) -> list[Path]:
    src = tmp_path / "series"
    src.mkdir()
    files = [src / f"{i}.dcm" for i in range(3)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * 4096)
    return files


def test_disk_journal_loop_times_each_step_and_commits_a_row_per_file(tmp_path: Path) -> None:
    files = _tiny_files(tmp_path)
    t = ingest.measure_disk_limit(files, 1, tmp_path / "disk-journal", 0.012, journal=True)
    assert (t.receiver, t.associations, t.images) == ("disk+journal", 1, 3)
    assert t.per_file is not None and t.per_file.files == 3
    assert t.per_file.write_s > 0 and t.per_file.flush_s > 0 and t.per_file.commit_s > 0
    with sqlite3.connect(tmp_path / "disk-journal" / ingest.JOURNAL_FILE) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        paths = [row[0] for row in conn.execute("SELECT path FROM files ORDER BY id")]
    assert len(paths) == 3 and all(Path(p).read_bytes() == f.read_bytes() for p, f in zip(paths, files))
    assert ingest.to_json(_results(t))["throughput"][0]["ms_per_file"]["journal_commit"] > 0


def test_disk_limit_loop_has_no_journal(tmp_path: Path) -> None:
    files = _tiny_files(tmp_path)
    t = ingest.measure_disk_limit(files, 1, tmp_path / "disk", 0.012)
    assert t.receiver == "disk limit" and t.images == 3
    assert t.per_file is not None and t.per_file.files == 3 and t.per_file.commit_s == 0.0
    assert t.per_file.flush_s > 0
    assert not list((tmp_path / "disk").glob("*.sqlite3*"))
    assert len(list((tmp_path / "disk" / "instances").iterdir())) == 3


def test_round_ratios_pair_each_round_and_differ_from_the_ratio_of_the_bests() -> None:
    # round 1: edged 150 / disk 300 = 0.5; round 2: edged 200 / disk 250 = 0.8; round 3: 160 / 400 = 0.4
    r = _results(_ips("edged", 150.0), _ips("disk limit", 300.0), _ips("orthanc", 100.0),
                 _ips("edged", 200.0), _ips("disk limit", 250.0), _ips("orthanc", 80.0),
                 _ips("edged", 160.0), _ips("disk limit", 400.0), _ips("orthanc", 100.0),
                 _ips("edged", 300.0, associations=4), _ips("disk limit", 500.0, associations=4))
    assert ingest.round_ratios(r, "edged", "disk limit", 1) == pytest.approx([0.5, 0.8, 0.4])
    row1, row4 = ingest.ratios(r)
    assert row1["edged_over_disk_limit"] == pytest.approx(0.5)  # best edged 200 over best disk 400
    assert row1["edged_over_disk_limit_rounds"] == pytest.approx([0.5, 0.8, 0.4])
    assert row1["edged_over_disk_limit_median_round"] == pytest.approx(0.5)
    assert row1["edged_over_orthanc_rounds"] == pytest.approx([1.5, 2.5, 1.6])
    assert row1["edged_over_orthanc_median_round"] == pytest.approx(1.6)
    assert row4["edged_over_disk_limit_rounds"] == pytest.approx([0.6])
    assert row4["edged_over_orthanc_rounds"] == [] and row4["edged_over_orthanc_median_round"] is None
    text = ingest.report(r)
    assert "1 assoc., edged/disk-limit round by round: 0.50x, 0.80x, 0.40x (median 0.50x)" in text
    assert "1 assoc., edged/orthanc round by round: 1.50x, 2.50x, 1.60x (median 1.60x)" in text
    assert "4 assoc., edged/disk-limit round by round" not in text  # one round: nothing to add


# -- cache flushes of the work dir's disk -------------------------------------------------------------

def _fake_sysfs(root: Path, path: Path, stat: str, *, partition: bool = False) -> Path:
    """A /sys where ``path``'s device has the block stat line ``stat`` (on its parent disk if ``partition``)."""
    st = path.stat()
    disk = root / "devices" / "vda"
    dev = disk / "vda1" if partition else disk
    dev.mkdir(parents=True)
    (disk / "stat").write_text(stat)
    if partition:
        (dev / "partition").write_text("1\n")
        (dev / "stat").write_text(" ".join(["0"] * 17))  # a partition's own flush count stays 0
    (root / "dev" / "block").mkdir(parents=True)
    (root / "dev" / "block" / f"{ingest.os.major(st.st_dev)}:{ingest.os.minor(st.st_dev)}").symlink_to(dev)
    return root


# reads, merges, sectors, ticks; writes, merges, sectors, ticks; in flight, io ticks, queue;
# discards (4 fields); flushes 1234, flush ms 567
STAT = "10 0 80 5 20 0 160 9 0 14 14 0 0 0 0 1234 567\n"


@pytest.mark.parametrize("partition", [False, True])
def test_disk_counters_read_the_flush_fields_of_the_disk(tmp_path: Path, partition: bool) -> None:
    sys_root = _fake_sysfs(tmp_path / "sys", tmp_path, STAT, partition=partition)
    assert ingest.disk_counters(tmp_path, sys_root) == ingest.DiskCounters(1234, 567)


def test_disk_counters_none_without_the_counters(tmp_path: Path) -> None:
    assert ingest.disk_counters(tmp_path, tmp_path / "no-sys") is None
    old_kernel = _fake_sysfs(tmp_path / "sys", tmp_path, "10 0 80 5 20 0 160 9 0 14 14\n")  # 11 fields: no flushes
    assert ingest.disk_counters(tmp_path, old_kernel) is None


def test_flushes_per_image_in_the_table_and_json() -> None:
    t = Throughput("edged", 1, 100, 0.5, 51.3, device=ingest.DiskCounters(flushes=302, flush_ms=140))
    r = _results(t, _ips("disk limit", 400.0))
    assert t.flushes_per_image == pytest.approx(3.02)
    table = ingest.report(r).splitlines()
    header = next(line for line in table if line.startswith("receiver"))
    assert header.split()[-1] == "flushes/img"
    rows = table[table.index(header) + 2:]
    assert next(line for line in rows if line.startswith("edged ")).split()[5] == "3.02"
    assert next(line for line in rows if line.startswith("disk limit ")).split()[6] == "n/a"  # not counted
    row = ingest.to_json(r)["throughput"][0]
    assert (row["device_flushes"], row["device_flush_ms"]) == (302, 140)


def test_the_disk_loop_counts_its_device_while_it_runs(tmp_path: Path) -> None:
    files = _tiny_files(tmp_path)
    t = ingest.measure_disk_limit(files, 1, tmp_path / "disk", 0.012)
    if ingest.disk_counters(tmp_path) is None:
        assert t.device is None  # tmpfs, overlay or an older kernel: nothing to count
    else:
        assert t.device is not None and t.device.flushes >= 0 and t.device.flush_ms >= 0


@pytest.mark.parametrize(("task", "expected"), [("<none>\n", "ext4 (/srv, no journal)"), ("1234\n", "ext4 (/srv)"),
                                                (None, "ext4 (/srv)")])
def test_filesystem_says_when_ext4_has_no_journal(tmp_path: Path, task: str | None, expected: str) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text("/dev/vda / ext4 rw 0 0\n/dev/vdb /srv ext4 rw 0 0\ntmpfs /srv/t tmpfs rw 0 0\n")
    sysfs = tmp_path / "sys"
    (sysfs / "fs" / "ext4" / "vda").mkdir(parents=True)
    (sysfs / "fs" / "ext4" / "vda" / "journal_task").write_text("<none>\n")  # another disk's: not read
    if task is not None:
        (sysfs / "fs" / "ext4" / "vdb").mkdir(parents=True)
        (sysfs / "fs" / "ext4" / "vdb" / "journal_task").write_text(task)
    assert ingest.filesystem_of(Path("/srv/data"), mounts_file=mounts, sys_root=sysfs) == expected
    assert ingest.filesystem_of(Path("/srv/t/x"), mounts_file=mounts, sys_root=sysfs) == "tmpfs (/srv/t)"


def _scrape(observations: dict[str, list[float]]) -> str:
    """edged's own metrics (edged/metrics.py) after ``observations`` seconds per step, as /metrics serves them."""
    from prometheus_client import generate_latest

    from edged.metrics import Metrics

    m = Metrics()
    for step, values in observations.items():
        for v in values:
            m.store_step_seconds.labels(step).observe(v)
    return generate_latest(m.registry).decode()


def test_step_totals_and_means_between_two_scrapes() -> None:
    first = {s: [0.001] for s in ingest.STEPS}
    before = ingest.step_totals(_scrape(first))
    assert before == {s: (pytest.approx(0.001), 1) for s in ingest.STEPS}
    second = {s: [0.001, 0.002, 0.004] for s in ingest.STEPS}
    second["fsync"] = [0.001, 0.010, 0.020]
    after = ingest.step_totals(_scrape(second))
    ms = ingest.steps_ms(before, after)
    assert ms is not None
    assert ms["receive"] == pytest.approx(3.0)  # (2 + 4) ms over the 2 images between the scrapes
    assert ms["fsync"] == pytest.approx(15.0)
    assert list(ms) == list(ingest.STEPS)
    assert ingest.steps_ms(before, before) is None  # no image between: no means
    assert ingest.steps_ms({}, ingest.step_totals(_scrape({"receive": [0.001]}))) is None  # a step never seen


def test_step_block_shows_each_step_and_what_is_left_of_the_cycle() -> None:
    steps = {"receive": 2.0, "checks": 0.5, "fsync": 4.0, "commit": 3.0, "respond": 0.5}
    t = Throughput("edged", 4, 400, 1.6, 205.2, steps=steps)  # 4 x 1.6 s / 400 = 16 ms per image
    assert t.cycle_ms == pytest.approx(16.0)
    text = ingest.report(_results(t, _ips("disk limit", 500, 4)))
    block = text[text.index("where each association's time went"):]
    row = next(line for line in block.splitlines() if line.split()[:1] == ["4"])
    assert row.split() == ["4", "2.00", "0.50", "4.00", "3.00", "0.50", "6.00", "16.00"]
    d = t.as_dict()
    assert d["step_ms"] == steps and d["cycle_ms"] == 16.0
    assert "where each association's time went" not in ingest.report(_results(_ips("edged", 200)))


def _source_files(directory: Path, n: int, size: int) -> list[Path]:
    directory.mkdir()
    files = [directory / f"{i}.dcm" for i in range(n)]
    for i, f in enumerate(files):
        f.write_bytes(bytes([i]) * size)
    return files


def test_ordered_loop_paces_each_file_then_commits_every_row_in_groups(tmp_path: Path) -> None:
    files = _source_files(tmp_path / "src", 6, 1000)
    work = tmp_path / "ordered"
    for sub in ("tmp", "instances"):
        (work / sub).mkdir(parents=True)
    db = work / ingest.JOURNAL_FILE
    ingest._create_journal(db)
    group, journal = ingest.ordered_group(db, work / "instances")
    waits: list[float] = []
    try:
        ingest._paced_ordered_loop(files, work / "tmp", work / "instances", "w0", 0.5, group, sleep=waits.append)
    finally:
        journal.close()
    # one wait per file, for what was left of the pace after its write (never more than the pace)
    assert len(waits) == 6 and all(0 < w <= 0.5 for w in waits)
    assert sorted(p.name for p in (work / "instances").iterdir()) == [f"w0-{i}.dcm" for i in range(6)]
    assert [p.read_bytes() for p in sorted((work / "instances").iterdir())] == [f.read_bytes() for f in files]
    assert list((work / "tmp").iterdir()) == []
    assert ingest.journal_rows(db) == 6 and group.groups == 6  # one thread: each file its own group


def test_ordered_loop_with_threads_and_its_lines(tmp_path: Path) -> None:
    files = _source_files(tmp_path / "src", 8, 4096)
    t = ingest.measure_ordered(files, 4, 0.001, tmp_path / "ordered", 0.03)
    assert (t.receiver, t.associations, t.images) == ("ordered", 4, 8)
    assert ingest.journal_rows(tmp_path / "ordered" / ingest.JOURNAL_FILE) == 8
    r = _results(_ips("edged", 150, 4), _ips("disk limit", 500, 4), Throughput("ordered", 4, 100, 0.5, 51.3))
    text = ingest.report(r)
    line = next(x for x in text.splitlines() if x.strip().startswith("4 assoc.: ordered/disk-limit"))
    # ordered 200/s against the disk limit's 500; edged 150/s; 0.6 x 500 = 300 = 1.5 x ordered
    assert "ordered/disk-limit 0.40x" in line and "edged/ordered 0.75x" in line and "= 1.50x 'ordered'" in line
    row = next(x for x in ingest.to_json(r)["ratios"] if x["associations"] == 4)
    assert row["edged_over_ordered"] == 0.75 and row["ordered_over_disk_limit"] == 0.4


def test_ordered_round_by_round() -> None:
    r = _results()
    for edged, disk, ordered in ((150, 500, 200), (100, 250, 200)):
        for t in (_ips("edged", edged, 4), _ips("disk limit", disk, 4), Throughput("ordered", 4, 100, 100 / ordered, 51.3)):
            r.add(t)
    lines = "\n".join(ingest._round_lines(r))
    assert "4 assoc., ordered/disk-limit round by round: 0.40x, 0.80x (median 0.60x)" in lines
    assert "4 assoc., edged/ordered round by round: 0.75x, 0.50x (median 0.62x)" in lines
    row = next(x for x in ingest.to_json(r)["ratios"] if x["associations"] == 4)
    assert row["ordered_over_disk_limit_rounds"] == [0.4, 0.8] and row["edged_over_ordered_median_round"] == 0.625


def test_setup_calls_take_turns_with_the_first_receiver_rotating() -> None:
    ran: list[str] = []
    now = [0.0]

    def run(cmd: list[str]) -> None:
        ran.append(cmd[0])
        now[0] += {"edged": 0.005, "storescp": 0.004, "orthanc": 0.006}[cmd[0]]

    cmds = {name: [[name]] * 3 for name in ("edged", "orthanc", "storescp")}
    ms = ingest.interleaved_ms(cmds, run=run, clock=lambda: now[0])
    assert ran == ["edged", "orthanc", "storescp", "orthanc", "storescp", "edged", "storescp", "edged", "orthanc"]
    assert ms["edged"] == pytest.approx([5.0] * 3) and ms["storescp"] == pytest.approx([4.0] * 3)


def test_setup_ratios_are_taken_within_each_round_and_the_best_round_kept() -> None:
    r = _results()
    for setup in (ingest.Setup("edged", 30, 50.0, 60.0, 0), ingest.Setup("storescp", 30, 40.0, 40.0, 0),
                  ingest.Setup("edged", 30, 44.0, 66.0, 1), ingest.Setup("storescp", 30, 44.0, 55.0, 1)):
        r.add_setup(setup)
    echo, store = ingest.setup_round_ratios(r, "edged", "storescp")
    assert echo == pytest.approx([1.25, 1.0]) and store == pytest.approx([1.5, 1.2])
    best = {s.receiver: s for s in r.setup}
    assert (best["edged"].echo_ms, best["edged"].store_one_ms) == (44.0, 60.0)
    assert any("edged/storescp round by round" in line and "(median 1.35x)" in line
               for line in ingest._setup_round_lines(r))
