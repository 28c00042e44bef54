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
    upstream_api_key: str | None = field(default=None, repr=False)
    """Sent to the instances on the router's own calls (health, KV events, tokenize) when
    they require a key; clients' requests carry their own."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """``ROUTER_FIELDS`` only: policy, its weights, and retries."""

    def __post_init__(self) -> None:
        if not self.instances:
            raise ValueError("give at least one --instance URL")
        if len(self.instances) > MAX_INSTANCES:
            raise ValueError(f"at most {MAX_INSTANCES} instances, got {len(self.instances)}")
        urls = tuple(check_instance_url(u) for u in self.instances)
        if len(set(urls)) != len(urls):
            raise ValueError("an --instance URL is given twice")
        object.__setattr__(self, "instances", urls)  # normalised once, at the edge
        for name in ("poll_interval_s", "request_timeout_s", "connect_timeout_s"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0 < value < 1e6):
                raise ValueError(f"{name} must be a positive number of seconds, got {value!r}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port must be in [1, 65535], got {self.port}")
        if self.max_request_body_bytes < 1:
            raise ValueError("max_request_body_bytes must be positive")
