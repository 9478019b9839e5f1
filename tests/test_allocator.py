"""The GPU allocator: each policy on small inventories, the TP and PP rules,
queue reasons, fragmentation, and the `scaletrain allocate` command."""

import json

import pytest
from harness import run_cli

from scaletrain.launch.allocator import Cluster, Job, Node, allocate


def nodes(*spec):
    """nodes(("a", 8), ("b", 4, "rack2"), ...)"""
    return [Node(name, gpus, *rack) for name, gpus, *rack in spec]


def hosts(placement):
    return [(h, g) for h, g in placement.hosts]


def test_best_fit_takes_the_tightest_node_and_keeps_a_whole_node_free():
    jobs = [Job("four", dp=4), Job("eight", tp=8)]
    cluster, placed, queued = allocate(nodes(("a", 8), ("b", 4)), jobs, "best_fit")
    assert [hosts(p) for p in placed] == [[("b", [0, 1, 2, 3])], [("a", list(range(8)))]]
    assert queued == {} and cluster.free == 0
    # first fit puts the 4-GPU job on the big node; the 8-GPU TP group then cannot run
    cluster, placed, queued = allocate(nodes(("a", 8), ("b", 4)), jobs, "first_fit")
    assert hosts(placed[0]) == [("a", [0, 1, 2, 3])]
    assert "eight" in queued and "groups of 8 on one node" in queued["eight"]
    assert cluster.fragmentation() == pytest.approx(0.5)  # a's 4 free GPUs sit on a partly used node


def test_first_fit_fills_nodes_in_inventory_order():
    _, placed, _ = allocate(nodes(("a", 8), ("b", 8)), [Job(f"j{i}", dp=3) for i in range(3)], "first_fit")
    assert [hosts(p) for p in placed] == [[("a", [0, 1, 2])], [("a", [3, 4, 5])], [("a", [6, 7]), ("b", [0])]]


def test_load_balance_spreads_small_jobs():
    cluster, placed, _ = allocate(nodes(("a", 8), ("b", 8)), [Job(f"j{i}") for i in range(4)], "load_balance")
    assert [p.hosts[0][0] for p in placed] == ["a", "b", "a", "b"]
    assert [n.used for n in cluster.nodes] == [2, 2]


def test_topology_keeps_a_job_inside_one_rack():
    inventory = nodes(("a", 8, "r1"), ("c", 8, "r2"), ("b", 8, "r1"), ("d", 8, "r2"))
    job = [Job("big", tp=8, dp=2)]
    _, placed, _ = allocate(inventory, job, "topology")
    assert [h for h, _ in placed[0].hosts] == ["a", "b"]
    _, placed, _ = allocate(nodes(("a", 8, "r1"), ("c", 8, "r2"), ("b", 8, "r1"), ("d", 8, "r2")), job, "first_fit")
    assert [h for h, _ in placed[0].hosts] == ["a", "c"]  # first fit crosses racks


def test_topology_prefers_the_tightest_rack():
    cluster = Cluster(nodes(("a", 8, "r1"), ("b", 8, "r1"), ("c", 4, "r2")))
    placement = cluster.place(Job("small", dp=4), "topology")
    assert hosts(placement) == [("c", [0, 1, 2, 3])]


@pytest.mark.parametrize("policy", ["first_fit", "best_fit", "load_balance", "topology"])
def test_tp_groups_never_straddle_nodes_and_stages_fill_nodes_in_order(policy):
    cluster = Cluster(nodes(("a", 8), ("b", 8), ("c", 8)))
    assert not isinstance(cluster.place(Job("taken", dp=2), policy), str)  # 6 GPUs left on one node
    placement = cluster.place(Job("tp4pp2", tp=4, pp=2, dp=2), policy)  # 16 GPUs
    assert not isinstance(placement, str), placement
    per_host = [len(g) for _, g in placement.hosts]
    assert all(n % 4 == 0 for n in per_host) and sum(per_host) == 16
    order = {"a": 0, "b": 1, "c": 2}
    assert [order[h] for h, _ in placement.hosts] == sorted(order[h] for h, _ in placement.hosts)
    rank_host = [h for h, g in placement.hosts for _ in g]
    for group in range(4):  # ranks 4k..4k+3 form a TP group
        assert len(set(rank_host[4 * group:4 * group + 4])) == 1
    stage0, stage1 = set(rank_host[:8]), set(rank_host[8:])
    assert max(order[h] for h in stage0) <= min(order[h] for h in stage1)


def test_queue_reasons_and_release():
    cluster = Cluster(nodes(("a", 4), ("b", 4)))
    assert "largest node has 4" in cluster.place(Job("wide-tp", tp=8), "best_fit")
    assert "whole cluster offers 8" in cluster.place(Job("huge", dp=12), "best_fit")
    first = cluster.place(Job("half", dp=6), "best_fit")
    waiting = cluster.place(Job("next", dp=4), "best_fit")
    assert waiting.startswith("waiting:") and "2 free" in waiting
    cluster.release(first)
    assert cluster.free == 8 and not isinstance(cluster.place(Job("next", dp=4), "best_fit"), str)


def test_fragmentation():
    cluster = Cluster(nodes(("a", 8), ("b", 8)))
    assert cluster.fragmentation() == 0.0
    cluster.place(Job("x", dp=2), "first_fit")
    assert cluster.fragmentation() == pytest.approx(6 / 14)


def test_allocate_command_writes_placements(tmp_path):
    inventory, jobs, out = tmp_path / "inv.toml", tmp_path / "jobs.toml", tmp_path / "out"
    inventory.write_text('[[node]]\nname = "gpu"\ngpus = 8\ncount = 2\n')
    jobs.write_text('[[job]]\nname = "llm"\ntp = 4\npp = 3\n\n[[job]]\nname = "big"\ngpus = 16\n')
    proc = run_cli(["allocate", "--inventory", str(inventory), "--jobs", str(jobs), "--policy", "first_fit",
                    "--out", str(out), "--json"], timeout=60)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["queued"]["big"].startswith("waiting:")
    llm = json.loads((out / "llm.json").read_text())
    assert llm["hosts"] == ["gpu-00", "gpu-01"]
    assert llm["cuda_visible_devices"] == {"gpu-00": "0,1,2,3,4,5,6,7", "gpu-01": "0,1,2,3"}
    assert llm["ranks"] == {"gpu-00": [0, 7], "gpu-01": [8, 11]}
    assert (out / "llm.hostfile").read_text() == "gpu-00 slots=8\ngpu-01 slots=4\n"
    assert report["utilisation"] == {"gpu-00": 1.0, "gpu-01": 0.5}


@pytest.mark.parametrize("inventory_text, jobs_text, needle", [
    ('[[node]]\nname = "a"\ngpus = 0\n', '[[job]]\ngpus = 1\n', "gpus = 0"),
    ('[[node]]\nname = "a"\ngpus = 8\nslots = 2\n', '[[job]]\ngpus = 1\n', "unknown key 'slots'"),
    ('[[node]]\nname = "a"\ngpus = 8\n', '[[job]]\ngpus = 6\ntp = 4\n', "not a multiple of tp x pp"),
    ('[[node]]\nname = "a"\ngpus = 8\n', 'job = 3\n', "[[job]]"),
    ('[[node]\n', '[[job]]\ngpus = 1\n', "malformed TOML"),
])
def test_allocate_bad_input(tmp_path, inventory_text, jobs_text, needle):
    inventory, jobs, out = tmp_path / "inv.toml", tmp_path / "jobs.toml", tmp_path / "out"
    inventory.write_text(inventory_text)
    jobs.write_text(jobs_text)
    proc = run_cli(["allocate", "--inventory", str(inventory), "--jobs", str(jobs), "--out", str(out)], timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    assert not out.exists()


def test_simulation_of_a_small_stream():
    from scaletrain.launch.simulate import simulate

    jobs = [Job("a", dp=4, submit_s=0.0, duration_s=2.0), Job("b", dp=4, submit_s=0.0, duration_s=1.0),
            Job("c", dp=8, submit_s=0.5, duration_s=1.0), Job("d", dp=1, submit_s=0.5, duration_s=1.0)]
    result = simulate(nodes(("n0", 4), ("n1", 4)), jobs, "first_fit")
    # c (8 GPUs) waits for a and d to end at t=2; d backfills when b ends at t=1
    assert result.mean_wait == pytest.approx((0 + 0 + 1.5 + 0.5) / 4)
    assert result.makespan == pytest.approx(3.0)
    assert result.utilisation == pytest.approx(1.0)  # all 8 GPUs busy until the last arrival
    assert result.never_ran == 0
