"""Options of ``tessera router``: built once from the command line (or by tests)."""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import urlsplit

from tessera.cli_options import option
from tessera.config import ClusterConfig

MIB = 1 << 20
ROUTER_FIELDS = ("router_policy", "router_overlap_weight", "router_load_weight",
                 "max_request_retries")
"""The placement options the router shares with ``--data-parallel`` (``ClusterConfig``)."""
MAX_INSTANCES = 64


def check_instance_url(url: str) -> str:
    """``url`` without a trailing slash if it is an http(s) URL with a host; else ValueError."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"--instance {url!r} is not an http(s) URL with a host "
                         "(like http://10.0.0.5:8000)")
    if parts.query or parts.fragment:
        raise ValueError(f"--instance {url!r}: give the server's base URL, without a query")
    return url.rstrip("/")


@dataclass(frozen=True)
class RouterConfig:
    """Where the instances are and how requests are placed on them."""

    instances: tuple[str, ...]
    """Base URLs of running ``tessera serve`` servers (``--instance``, repeated)."""
    prefill_instances: tuple[str, ...] = ()
    """Servers that compute prompts (``--prefill-instance``); with ``decode_instances``."""
    decode_instances: tuple[str, ...] = ()
    """Servers that generate, finding the prompts' blocks in the KV tier they share with the
    prefill servers (``--decode-instance``)."""
    host: str = option("127.0.0.1", "interface to listen on")
    port: int = option(8000, "port to listen on")
    poll_interval_s: float = option(
        0.2, "seconds between polls of each instance's health and KV events",
        flag="--poll-interval")
    request_timeout_s: float = option(
        600.0, "seconds an instance may go without sending a byte of its answer",
        flag="--request-timeout")
    connect_timeout_s: float = option(
        5.0, "seconds to connect to an instance before trying another", flag="--connect-timeout")
    max_request_body_bytes: int = option(4 * MIB, "largest request body; larger gets 413")
    max_connections: int = option(
        4096, "open client connections beyond which the router answers 503 at once")
    request_body_timeout_s: float = option(
        60.0, "seconds a client may take to send a request body; slower gets 408",
        flag="--request-body-timeout")
    upstream_api_key: str | None = field(default=None, repr=False)
    """Sent to the instances on the router's own calls (health, KV events, tokenize) when
    they require a key; clients' requests carry their own."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """``ROUTER_FIELDS`` only: policy, its weights, and retries."""

    def __post_init__(self) -> None:
        if bool(self.prefill_instances) != bool(self.decode_instances):
            raise ValueError("--prefill-instance and --decode-instance go together: give both")
        if self.prefill_instances and self.instances:
            raise ValueError("give --instance, or --prefill-instance and --decode-instance, "
                             "not both")
        if not (self.instances or self.prefill_instances):
            raise ValueError("give at least one --instance URL")
        for name in ("instances", "prefill_instances", "decode_instances"):
            # normalised once, at the edge
            object.__setattr__(self, name, tuple(check_instance_url(u)
                                                 for u in getattr(self, name)))
        urls = self.urls
        if len(urls) > MAX_INSTANCES:
            raise ValueError(f"at most {MAX_INSTANCES} instances, got {len(urls)}")
        if len(set(urls)) != len(urls):
            raise ValueError("an instance URL is given twice")
        for name in ("poll_interval_s", "request_timeout_s", "connect_timeout_s",
                     "request_body_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < 1e6):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be positive")
        if self.max_connections < 1:
            raise ValueError("max_connections must be positive")

    @property
    def urls(self) -> tuple[str, ...]:
        """Every instance, each once: data-parallel ones, or prefill then decode ones."""
        return self.instances + self.prefill_instances + self.decode_instances

    @property
    def roles(self) -> tuple[str, ...]:
        """Each of ``urls``' role: ``both``, ``prefill`` or ``decode``."""
        return (("both",) * len(self.instances) + ("prefill",) * len(self.prefill_instances)
                + ("decode",) * len(self.decode_instances))
