from distgen.launchers.torchrun import TorchrunLauncher, torchrun_command


def test_single_node_torchrun_picks_its_own_port():
    cmd = torchrun_command(TorchrunLauncher(nproc_per_node=2), ["layout=fsdp"], python="py")
    assert cmd == ["py", "-m", "torch.distributed.run", "--nnodes=1", "--nproc-per-node=2", "--standalone",
                   "-m", "distgen.run", "layout=fsdp"]


def test_multi_node_torchrun_uses_the_rendezvous_endpoint():
    cfg = TorchrunLauncher(nproc_per_node=8, nnodes=2, rdzv_endpoint="head:29500")
    cmd = torchrun_command(cfg, [], python="py")
    assert "--nnodes=2" in cmd and "--rdzv-endpoint=head:29500" in cmd and "--standalone" not in cmd


def test_max_restarts_reaches_torchrun():
    cmd = torchrun_command(TorchrunLauncher(max_restarts=3), [], python="py")
    assert "--max-restarts=3" in cmd
    assert not any(arg.startswith("--max-restarts") for arg in torchrun_command(TorchrunLauncher(), [], python="py"))
