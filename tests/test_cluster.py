"""A real three-node RabbitMQ cluster on this machine, quorum queues, a node killed
mid-burst: every accepted message is delivered exactly once, and the server and the
worker carry on through the surviving nodes (AMQP_URL lists all three)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker import Names
from config import Secret, Settings
from launcher import port_open
from tests.conftest import running_worker, serving_app
from tests.support import SmtpServer, free_port

log = logging.getLogger(__name__)
COOKIE = "MAILROOMTESTCLUSTERCOOKIE"
BOOT_TIMEOUT = 90.0


def rabbitmq_sbin() -> Path | None:
    """The directory of RabbitMQ's own scripts (Debian's /usr/sbin ones switch to the
    rabbitmq user and its environment, which a test node must not use)."""
    found = sorted(Path("/usr/lib/rabbitmq/lib").glob("rabbitmq_server-*/sbin"))
    return found[-1] if found and (found[-1] / "rabbitmq-server").is_file() else None


@dataclass
class Node:
    name: str
    port: int
    env: dict[str, str]
    process: asyncio.subprocess.Process | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"


class Cluster:
    def __init__(self, sbin: Path, base: Path) -> None:
        self.sbin = sbin
        self.base = base
        home = base / "home"
        home.mkdir(parents=True)
        cookie = home / ".erlang.cookie"
        cookie.write_text(COOKIE)
        cookie.chmod(0o400)
        (base / "enabled_plugins").write_text("[].\n")
        (base / "env.conf").write_text("")
        self.nodes = [self._node(n, home) for n in (1, 2, 3)]
        self.names = {node.name for node in self.nodes}
        self.started = time.monotonic()

    def _node(self, n: int, home: Path) -> Node:
        data = self.base / f"node{n}"
        (data / "log").mkdir(parents=True)
        (data / "rabbitmq.conf").write_text("log.console = false\n")
        name = f"mailroom-test-{n}-{uuid.uuid4().hex[:6]}@localhost"
        port = free_port()
        env = {
            "PATH": f"{self.sbin}:/usr/local/bin:/usr/bin:/bin",
            "HOME": str(home),
            "LANG": "C.UTF-8",
            "RABBITMQ_NODENAME": name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_MNESIA_BASE": str(data / "mnesia"),
            "RABBITMQ_LOG_BASE": str(data / "log"),
            "RABBITMQ_CONFIG_FILE": str(data / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(data / "advanced.config"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.base / "enabled_plugins"),
            "RABBITMQ_CONF_ENV_FILE": str(self.base / "env.conf"),
            "RABBITMQ_PID_FILE": str(data / "pid"),
            "RABBITMQ_GENERATED_CONFIG_DIR": str(data / "config"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            # No scheduler busy-waiting: four brokers share this machine's cores.
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}"
            " +sbwt none +sbwtdcpu none +sbwtdio none",
        }
        return Node(name, port, env)

    async def start(self) -> None:
        self.started = time.monotonic()
        for node in self.nodes:
            out = open(self.base / f"{node.name.split('@')[0]}.out", "wb")  # noqa: SIM115
            with out:
                node.process = await asyncio.create_subprocess_exec(
                    str(self.sbin / "rabbitmq-server"),
                    cwd=self.base,
                    env=node.env,
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=out,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
        async with asyncio.timeout(BOOT_TIMEOUT):
            for node in self.nodes:
                while not await port_open("127.0.0.1", node.port):
                    assert node.process is not None
                    if node.process.returncode is not None:
                        raise AssertionError(f"{node.name} exited: {self.output(node)}")
                    await asyncio.sleep(0.2)
        log.info("three nodes listening after %.1f s", self.elapsed())
        first = self.nodes[0].name
        for node in self.nodes[1:]:
            await self.ctl(node, "stop_app")
            await self.ctl(node, "join_cluster", first)
            await self.ctl(node, "start_app")
            log.info("%s joined the cluster after %.1f s", node.name, self.elapsed())
        # Quorum queues are placed on the nodes that the declaring node (the first one
        # in AMQP_URL) sees running: one not yet seen would leave every queue with fewer
        # members, and then one node killed is a lost majority, not a lost node.
        async with asyncio.timeout(BOOT_TIMEOUT):
            while await self.running_nodes(self.nodes[0]) != self.names:
                await asyncio.sleep(0.5)
        log.info("cluster of three running after %.1f s", self.elapsed())

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    async def running_nodes(self, node: Node) -> set[str]:
        status = json.loads(await self.ctl(node, "cluster_status", "--formatter", "json"))
        return set(status.get("running_nodes", []))

    async def quorum_queues(self, node: Node) -> list[dict[str, Any]]:
        """The quorum queues as ``node`` sees them: name, members, online, leader."""
        out = await self.ctl(
            node,
            "list_queues",
            "name",
            "type",
            "members",
            "online",
            "leader",
            "--formatter",
            "json",
        )
        return [q for q in json.loads(out) if q["type"] == "quorum"]

    async def wait_fully_replicated(self, node: Node, queues: set[str], timeout: float) -> None:
        """Until each of ``queues`` is a quorum queue with a member online on every node
        (else the kill below would test a lost majority, not a lost node)."""
        seen: list[dict[str, Any]] = []
        try:
            async with asyncio.timeout(timeout):
                while True:
                    seen = await self.quorum_queues(node)
                    ours = {q["name"]: set(q["online"]) for q in seen if q["name"] in queues}
                    if set(ours) == queues and all(on == self.names for on in ours.values()):
                        log.info("queues on all three nodes after %.1f s", self.elapsed())
                        return
                    await asyncio.sleep(0.5)
        except TimeoutError:
            raise AssertionError(f"quorum queues not on all three nodes: {seen}") from None

    def output(self, node: Node) -> str:
        return (self.base / f"{node.name.split('@')[0]}.out").read_text(errors="replace")[-3000:]

    async def ctl(self, node: Node, *args: str) -> str:
        proc = await asyncio.create_subprocess_exec(
            str(self.sbin / "rabbitmqctl"),
            "-q",
            "-n",
            node.name,
            *args,
            env=node.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, f"rabbitmqctl {' '.join(args)}: {out.decode()}"
        return out.decode()

    def kill(self, node: Node) -> None:
        """A crash: the node's whole process group at once (beam, epmd child, ...)."""
        if node.process is not None and node.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(node.process.pid, signal.SIGKILL)

    async def close(self) -> None:
        for node in self.nodes:
            self.kill(node)
        for node in self.nodes:
            if node.process is not None:
                await asyncio.wait_for(node.process.wait(), 30)


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    sbin = rabbitmq_sbin()
    if sbin is None:
        pytest.skip("rabbitmq-server is not installed here (scripts/ensure-rabbitmq.sh)")
    cluster = Cluster(sbin, tmp_path / "cluster")
    try:
        await cluster.start()
        yield cluster
    finally:
        await cluster.close()


@pytest.mark.timeout(480)  # three brokers booting on a busy machine take minutes
async def test_quorum_queues_survive_a_node_killed_mid_burst(
    cluster: Cluster, make_settings: Callable[..., Settings], smtp: SmtpServer
) -> None:
    settings = make_settings(
        amqp_url=Secret(",".join(node.url for node in cluster.nodes)),
        queue_type="quorum",
        publish_timeout=10.0,
        **smtp.settings_overrides(None, login=False),
    )
    total = 60
    answers: dict[int, int] = {}
    killed_at: list[int] = []

    async def send(client: httpx.AsyncClient, base: str, n: int) -> None:
        body = {"to": f"r{n}@example.com", "subject": f"cluster {n}", "text": "t"}
        try:
            response = await client.post(f"{base}/api/messages", json=body)
        except httpx.TransportError:
            answers[n] = 0
            return
        answers[n] = response.status_code

    async with (
        serving_app(settings) as base,
        running_worker(settings),
        httpx.AsyncClient(trust_env=False, timeout=30) as client,
    ):
        queues = set(Names.of(settings).all_queues())
        await cluster.wait_fully_replicated(cluster.nodes[1], queues, timeout=60)
        n = 0
        try:
            async with asyncio.timeout(150):
                while sum(1 for code in answers.values() if code == 202) < total:
                    await asyncio.gather(*(send(client, base, n + k) for k in range(4)))
                    if all(answers[n + k] != 202 for k in range(4)):
                        await asyncio.sleep(0.2)  # no node to publish to yet: not a busy loop
                    n += 4
                    accepted = sum(1 for code in answers.values() if code == 202)
                    if not killed_at and accepted >= total // 3:
                        cluster.kill(cluster.nodes[0])  # the node both processes use
                        killed_at.append(n)
                        log.info("killed %s after %.1f s", cluster.nodes[0].name, cluster.elapsed())
        except TimeoutError:
            codes = Counter(answers.values())
            state = await cluster.quorum_queues(cluster.nodes[1])
            raise AssertionError(f"answers {dict(codes)} after the kill; queues: {state}") from None
        log.info("burst accepted after %.1f s: %s", cluster.elapsed(), Counter(answers.values()))
        accepted_ids = [k for k, code in answers.items() if code == 202]
        after = [k for k in accepted_ids if k >= killed_at[0]]
        assert len(after) >= total // 2, "nothing accepted through the surviving nodes"
        await smtp.recorder.wait_for(len(accepted_ids), timeout=90)
    got = Counter(a for mail in smtp.recorder.received for a in mail.rcpt_tos)
    for k in accepted_ids:
        assert got[f"r{k}@example.com"] == 1, (k, got[f"r{k}@example.com"])
    assert max(got.values()) == 1, [a for a, c in got.items() if c > 1]
    print(f"{len(accepted_ids)} accepted, {len(answers) - len(accepted_ids)} refused (503)")
