"""
Discovery's pure parts: the settings, this host's socket tables as Linux
and macOS write them, the model servers' answers, Docker's container
list, and the names servers get.
"""

from __future__ import annotations

import json

from twisted.trial.unittest import SynchronousTestCase

from cllama_tx.discovery import docker, netstat, servers, settings
from cllama_tx.discovery.netstat import ListeningSocket
from cllama_tx.testing.local_servers import FakeLocalServer, container

PROC_TCP = """\
  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 0100007F:2CAA 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41712 1 0000000000000000 100 0 0 10 0
   1: 00000000:04D2 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41713 1 0000000000000000 100 0 0 10 0
   2: 0500000A:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 41714 1 0000000000000000 100 0 0 10 0
   3: 0100007F:2CAA 0100007F:D431 01 00000000:00000000 00:00000000 00000000  1000        0 41715 1 0000000000000000 20 4 30 10 -1
   4: 0200007F:1F90 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 41716 1 0000000000000000 100 0 0 10 0
   5: garbage
"""

PROC_TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000001000000:1F40 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52001 1 0000000000000000 100 0 0 10 0
   1: 00000000000000000000000000000000:04D2 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52002 1 0000000000000000 100 0 0 10 0
   2: 0000000000000000FFFF00000100007F:1389 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52003 1 0000000000000000 100 0 0 10 0
   3: 000080FE00000000FF005450B6AD1DFE:2328 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0 52004 1 0000000000000000 100 0 0 10 0
"""

LSOF = """\
p812
f6
tIPv4
n127.0.0.1:11434
p901
f5
tIPv6
n*:1234
f7
tIPv4
n*:8000
f9
tIPv6
n[::1]:8081
f11
tIPv4
n192.168.1.20:9000
f12
tIPv4
n127.0.0.1:5000->127.0.0.1:60000
"""


class SettingsTests(SynchronousTestCase):
    def test_off_by_default_with_its_defaults(self):
        s = settings.from_env({})
        self.assertFalse(s.enabled)
        self.assertEqual(s.targets, ())
        self.assertTrue(s.port_scan)
        self.assertEqual(s.ports, ((1024, 65535),))
        self.assertEqual(s.docker_socket, "/var/run/docker.sock")
        self.assertIsNone(s.docker_project)
        self.assertEqual((s.interval, s.probe_timeout, s.concurrency), (60.0, 1.0, 16))
        self.assertFalse(s.port_allowed(22))
        self.assertFalse(s.port_allowed(6379))  # Redis logs an HTTP request as an attack
        self.assertTrue(s.port_allowed(11434))

    def test_every_setting(self):
        s = settings.from_env(
            {
                "CLLAMA_DISCOVERY": "on",
                "CLLAMA_DISCOVERY_TARGETS": "127.0.0.1:11434, GPU-Box:8000 [::1]:1234 127.0.0.1:11434",
                "CLLAMA_DISCOVERY_PORT_SCAN": "off",
                "CLLAMA_DISCOVERY_PORTS": "11434,8000-8100",
                "CLLAMA_DISCOVERY_EXCLUDE_PORTS": "8050-8052",
                "CLLAMA_DISCOVERY_DOCKER_SOCKET": "unix:///run/user/1000/docker.sock",
                "CLLAMA_DISCOVERY_DOCKER_PROJECT": "pod-a",
                "CLLAMA_DISCOVERY_INTERVAL": "5m",
                "CLLAMA_DISCOVERY_PROBE_TIMEOUT": "500ms",
                "CLLAMA_DISCOVERY_CONCURRENCY": "4",
            }
        )
        self.assertTrue(s.enabled)
        self.assertEqual(s.targets, (("127.0.0.1", 11434), ("gpu-box", 8000), ("::1", 1234)))
        self.assertFalse(s.port_scan)
        self.assertEqual(s.ports, ((11434, 11434), (8000, 8100)))
        self.assertEqual([p for p in range(8049, 8054) if s.port_allowed(p)], [8049, 8053])
        self.assertFalse(s.port_allowed(1234))
        self.assertEqual(s.docker_socket, "/run/user/1000/docker.sock")
        self.assertEqual(s.docker_project, "pod-a")
        self.assertEqual((s.interval, s.probe_timeout, s.concurrency), (300.0, 0.5, 4))
        self.assertIsNone(settings.from_env({"CLLAMA_DISCOVERY_DOCKER_SOCKET": "off"}).docker_socket)

    def test_settings_it_cannot_read_are_refused_by_name(self):
        for name, value, said in [
            ("CLLAMA_DISCOVERY", "maybe", "CLLAMA_DISCOVERY must be on or off"),
            ("CLLAMA_DISCOVERY_TARGETS", "11434", "write host:port"),
            ("CLLAMA_DISCOVERY_TARGETS", "localhost:0", "from 1 to 65535"),
            ("CLLAMA_DISCOVERY_TARGETS", "http://x:1", "write host:port"),
            ("CLLAMA_DISCOVERY_TARGETS", "[zz]:1", "not an IPv6 address"),
            ("CLLAMA_DISCOVERY_PORTS", "9000-8000", "ends before it starts"),
            ("CLLAMA_DISCOVERY_PORTS", "70000", "from 1 to 65535"),
            ("CLLAMA_DISCOVERY_DOCKER_SOCKET", "docker.sock", "absolute path"),
            ("CLLAMA_DISCOVERY_DOCKER_PROJECT", "Pod A", "compose project name"),
            ("CLLAMA_DISCOVERY_INTERVAL", "0.5", "at least 1 seconds"),
            ("CLLAMA_DISCOVERY_INTERVAL", "soon", "positive duration"),
            ("CLLAMA_DISCOVERY_PROBE_TIMEOUT", "1m", "at most 30 seconds"),
            ("CLLAMA_DISCOVERY_CONCURRENCY", "0", "from 1 to 256"),
        ]:
            with self.assertRaises(settings.SettingsError) as caught:
                settings.from_env({name: value})
            self.assertIn(said, str(caught.exception), (name, value))


class SocketTableTests(SynchronousTestCase):
    def test_proc_net_tcp_listeners_only(self):
        found = netstat.parse_proc_net_tcp(PROC_TCP)
        self.assertEqual(
            found,
            [
                ListeningSocket("127.0.0.1", 11434, inode=41712),
                ListeningSocket("0.0.0.0", 1234, inode=41713),
                ListeningSocket("10.0.0.5", 8000, inode=41714),
                ListeningSocket("127.0.0.2", 8080, inode=41716),
            ],
        )

    def test_proc_net_tcp6_words_are_little_endian(self):
        found = netstat.parse_proc_net_tcp(PROC_TCP6)
        self.assertEqual(
            [(s.address, s.port, s.inode) for s in found],
            [("::1", 8000, 52001), ("::", 1234, 52002), ("::ffff:7f00:1", 5001, 52003),
             ("fe80::5054:ff:fe1d:adb6", 9000, 52004)],
        )

    def test_lsof_field_output(self):
        found = netstat.parse_lsof(LSOF)
        self.assertEqual(
            [(s.address, s.port, s.pid) for s in found],
            [("127.0.0.1", 11434, 812), ("::", 1234, 901), ("0.0.0.0", 8000, 901), ("::1", 8081, 901),
             ("192.168.1.20", 9000, 901)],
        )

    def test_only_this_hosts_loopback_and_wildcard_sockets_are_probed(self):
        self.assertEqual(netstat.loopback_for("0.0.0.0"), "127.0.0.1")
        self.assertEqual(netstat.loopback_for("::"), "::1")
        self.assertEqual(netstat.loopback_for("127.0.0.2"), "127.0.0.2")
        self.assertEqual(netstat.loopback_for("::ffff:127.0.0.1"), "127.0.0.1")
        for elsewhere in ("10.0.0.5", "192.168.1.20", "fe80::5054:ff:fe1d:adb6", "8.8.8.8", "not-an-ip"):
            self.assertIsNone(netstat.loopback_for(elsewhere), elsewhere)

    def test_scan_targets_one_per_port_minus_own_and_disallowed(self):
        sockets = netstat.parse_proc_net_tcp(PROC_TCP) + netstat.parse_proc_net_tcp(PROC_TCP6)
        targets = netstat.scan_targets(sockets, lambda port: port != 5001, own_ports=[8080])
        # 1234 listens on 0.0.0.0 and on ::: probed once, through IPv4.
        self.assertEqual(
            [(t.host, t.port) for t in targets], [("127.0.0.1", 1234), ("::1", 8000), ("127.0.0.1", 11434)]
        )
        self.assertEqual(targets[0].identity, ("0.0.0.0", 1234, 41713, None))


class ServerAnswerTests(SynchronousTestCase):
    """The fakes' bodies are the real servers' shapes: each is read as its kind."""

    def _native(self, kind, path, models=("llama3.2:latest", "qwen2.5:7b")):
        fake = FakeLocalServer(None, kind, list(models))
        status, body, _ = fake._native(path)
        return status, json.loads(body)

    def test_ollama_tags(self):
        status, doc = self._native("ollama", "/api/tags")
        self.assertEqual(status, 200)
        self.assertEqual(servers.ollama_models(doc), ["llama3.2:latest", "qwen2.5:7b"])
        self.assertEqual(servers.ollama_models({"models": []}), [])
        for other in ({"models": "x"}, {"models": [{"size": 1}]}, [], None, {"data": []}):
            self.assertIsNone(servers.ollama_models(other), other)

    def test_llamacpp_answers_tags_with_both_lists_and_is_not_ollama(self):
        _, doc = self._native("llamacpp", "/api/tags", ["qwen2.5-7b-instruct-q4_k_m.gguf"])
        self.assertIsNone(servers.ollama_models(doc))
        self.assertEqual(servers.openai_models(doc), (["qwen2.5-7b-instruct-q4_k_m.gguf"], servers.LLAMACPP))

    def test_model_lists_by_owner(self):
        _, doc = self._native("vllm", "/v1/models", ["meta-llama/Llama-3.1-8B-Instruct"])
        self.assertEqual(servers.openai_models(doc), (["meta-llama/Llama-3.1-8B-Instruct"], servers.VLLM))
        _, doc = self._native("openai", "/v1/models", ["phi-4"])
        self.assertEqual(servers.openai_models(doc), (["phi-4"], None))
        _, doc = self._native("lmstudio", "/v1/models", ["qwen2.5-7b-instruct"])
        self.assertEqual(servers.openai_models(doc), (["qwen2.5-7b-instruct"], None))
        _, native = self._native("lmstudio", "/api/v0/models", ["qwen2.5-7b-instruct"])
        self.assertTrue(servers.is_lmstudio(native))
        self.assertFalse(servers.is_lmstudio(doc))

    def test_unroutable_ids_are_left_out_and_lists_are_bounded(self):
        doc = {"object": "list", "data": [{"id": "ok-1"}, {"id": "has space"}, {"id": "x" * 300}, {"id": "ok-1"}]}
        self.assertEqual(servers.openai_models(doc), (["ok-1"], None))
        many = {"data": [{"id": f"m{i}"} for i in range(servers.MAX_MODELS + 5)]}
        self.assertEqual(len(servers.openai_models(many)[0]), servers.MAX_MODELS)
        for other in ({"detail": "Not Found"}, {"data": [{"name": "x"}]}, {"object": "error", "data": []}, "x"):
            self.assertIsNone(servers.openai_models(other), other)

    def test_names(self):
        self.assertEqual(servers.host_server_name("ollama", "127.0.0.1", 11434), "local-ollama-11434")
        self.assertEqual(servers.host_server_name("vllm", "localhost", 8000), "local-vllm-8000")
        self.assertEqual(servers.host_server_name("vllm", "::1", 8000), "local-vllm-8000")
        self.assertEqual(servers.host_server_name("openai", "gpu-box.lan", 5000), "local-openai-gpu-box.lan-5000")
        self.assertEqual(servers.host_server_name("openai", "fd00::7", 5000), "local-openai-fd00-7-5000")
        self.assertEqual(servers.container_server_name("Ollama", 11434), "docker-ollama")
        self.assertEqual(servers.container_server_name("ollama", 11434, "2"), "docker-ollama-2")
        self.assertEqual(servers.container_server_name("tools_llm", 8000, "1", several=True), "docker-tools_llm-8000")
        long = servers.host_server_name("openai", "a" * 80 + ".example", 65535)
        self.assertEqual((len(long), long[-6:]), (64, "-65535"))
        self.assertEqual(servers.unique_name("docker-ollama", {"docker-ollama", "docker-ollama-2"}), "docker-ollama-3")
        self.assertEqual(servers.base_url("::1", 8000), "http://[::1]:8000/v1")


class DockerAnswerTests(SynchronousTestCase):
    def test_addresses_in_order_networks_then_published_loopback(self):
        doc = [
            container("pod-ollama-1", ports=[(11434, 11434)], address="172.18.0.4", project="pod", service="ollama"),
            container("pod-vllm-1", ports=[(8000, None), (8001, None)], address="172.18.0.5", project="pod",
                      service="vllm", number=2),
            container("other-app-1", ports=[(80, 8080)], project="other"),
            container("pod-old-1", ports=[(1234, None)], project="pod", state="exited"),
            container("pod-host-1", ports=[], project="pod", network="host"),
            "junk",
        ]
        found = docker.parse_containers(doc, "pod")
        self.assertEqual([c.name for c in found], ["pod-ollama-1", "pod-vllm-1"])
        ollama, vllm = found
        self.assertEqual((ollama.base, ollama.number, ollama.project), ("ollama", "1", "pod"))
        self.assertEqual(ollama.ports, (docker.ContainerPort(11434, (("172.18.0.4", 11434), ("127.0.0.1", 11434), ("::1", 11434))),))
        self.assertEqual([p.port for p in vllm.ports], [8000, 8001])
        self.assertEqual(vllm.ports[0].endpoints, (("172.18.0.5", 8000),))
        self.assertEqual(vllm.number, "2")
        self.assertEqual(len(docker.parse_containers(doc)), 3)  # without a project: every running one

    def test_the_request_filters_running_containers_of_the_project(self):
        path = docker.containers_path("pod")
        self.assertTrue(path.startswith("/containers/json?filters="))
        from urllib.parse import parse_qs, urlsplit

        filters = json.loads(parse_qs(urlsplit(path).query)["filters"][0])
        self.assertEqual(filters, {"status": ["running"], "label": ["com.docker.compose.project=pod"]})
        self.assertNotIn("label", json.loads(parse_qs(urlsplit(docker.containers_path(None)).query)["filters"][0]))
