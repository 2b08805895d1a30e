"""The artifact manifest: what a compiled artifact directory was built from and for, so that
`serve` refuses artifacts that no longer match the model, the weights or the machine."""

from __future__ import annotations

import hashlib
import json
import platform
from pathlib import Path

import msgspec
import torch

MANIFEST_FILE = "manifest.json"
FORMAT = 3  # 2: index_cache_dtype; 3: block tables of any width in [min_table_blocks, max_blocks]
_SAMPLE_BYTES = 1 << 20


class StaleArtifactsError(ValueError):
    """Artifacts that do not match what they would run with; the message says what differs and how to rebuild."""


class BucketArtifact(msgspec.Struct, forbid_unknown_fields=True):
    tokens: int
    file: str
    sha256: str
    compile_s: float
    graph_memory_bytes: int | None = None  # estimated CUDA graph memory (GPU builds only)


class Manifest(msgspec.Struct, forbid_unknown_fields=True):
    format: int
    glm5c_version: str
    created: str
    model_dir: str
    config_hash: str
    weight_fingerprint: str
    dtype: str
    device: str  # "cpu" | "cuda"
    device_name: str
    torch_version: str
    triton_version: str | None
    cuda_version: str | None
    block_size: int
    max_model_len: int
    min_table_blocks: int  # the narrowest block table the graphs take (they cover index_topk keys)
    index_cache_dtype: str  # the indexer key cache's dtype the graphs read (e.g. "float8_e4m3fn")
    ops: dict[str, str]  # op -> implementation compiled into the graphs
    constants_signature: str  # hash of every weight's name, shape and dtype the graphs take
    buckets: list[BucketArtifact]
    compile_s: float
    # the MTP layer's graph per bucket (empty: a model without MTP, or built by a glm5c that had none)
    mtp_buckets: list[BucketArtifact] = []
    mtp_left_out: bool = False  # built with --no-mtp

    @property
    def max_blocks(self) -> int:
        return -(-self.max_model_len // self.block_size)

    def write(self, out_dir: Path) -> None:
        (out_dir / MANIFEST_FILE).write_bytes(msgspec.json.format(msgspec.json.encode(self), indent=2) + b"\n")

    @classmethod
    def read(cls, artifacts_dir: str | Path) -> "Manifest":
        path = Path(artifacts_dir) / MANIFEST_FILE
        if not path.is_file():
            raise StaleArtifactsError(f"{artifacts_dir} has no {MANIFEST_FILE}: not a glm5c artifact directory")
        try:
            version = msgspec.json.decode(path.read_bytes()).get("format")
            if version != FORMAT:
                raise StaleArtifactsError(
                    f"{path} has format {version}, this glm5c reads format {FORMAT}: rebuild with `glm5c compile`"
                )
            return msgspec.json.decode(path.read_bytes(), type=cls)
        except (msgspec.DecodeError, AttributeError) as e:
            raise StaleArtifactsError(f"{path} is corrupted ({e}); rebuild with `glm5c compile`") from None

    def differences(self, model_dir: str | Path, device: str, dtype: str) -> list[str]:
        """Everything that differs between what the artifacts were built for and now."""
        now = environment(device)
        wanted = {
            "config.json (hash)": (self.config_hash, config_hash(model_dir)),
            "weights (fingerprint)": (self.weight_fingerprint, weight_fingerprint(model_dir)),
            "dtype": (self.dtype, dtype),
            **{key: (getattr(self, key), now[key]) for key in now},
        }
        return [f"{what}: built for {built!r}, now {current!r}" for what, (built, current) in wanted.items()
                if built != current]  # fmt: skip

    def check(self, artifacts_dir: str | Path, model_dir: str | Path, device: str, dtype: str) -> None:
        problems = self.differences(model_dir, device, dtype)
        for bucket in self.buckets + self.mtp_buckets:
            path = Path(artifacts_dir) / bucket.file
            if not path.is_file():
                problems.append(f"{bucket.file} is missing")
            elif file_sha256(path) != bucket.sha256:
                problems.append(f"{bucket.file} is corrupted (checksum differs)")
        if problems:
            raise StaleArtifactsError(
                f"artifacts in {artifacts_dir} do not match: " + "; ".join(problems) + ". Rebuild them: "
                + self.rebuild_command(artifacts_dir, model_dir, device, dtype)
            )

    def rebuild_command(self, artifacts_dir: str | Path, model_dir: str | Path, device: str, dtype: str,
                        mtp: bool | None = None) -> str:  # fmt: skip
        """The `glm5c compile` command that rebuilds these artifacts; `mtp`: with or without the MTP
        layer's graphs (default: as they were built)."""
        buckets = ",".join(str(b.tokens) for b in self.buckets)
        no_mtp = self.mtp_left_out if mtp is None else not mtp
        return (f"glm5c compile --model {model_dir} --out {artifacts_dir} --device {device} --dtype {dtype} "
                f"--buckets {buckets} --max-model-len {self.max_model_len} --block-size {self.block_size}"
                + (" --fp8-index-cache" if self.index_cache_dtype == "float8_e4m3fn" else "")
                + (" --no-mtp" if no_mtp else ""))  # fmt: skip


def environment(device: str) -> dict[str, str | None]:
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(device))
    else:  # compiled CPU code uses the vector ISA it was built for
        name = f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}"
    return {
        "device": "cuda" if device.startswith("cuda") else "cpu",
        "device_name": name,
        "torch_version": str(torch.__version__),
        "triton_version": triton_version,
        "cuda_version": torch.version.cuda if device.startswith("cuda") else None,
    }


def constants_signature(module: torch.nn.Module) -> str:
    """AOTInductor accepts weights of any shape at load without a word: hash what it was built for."""
    named = dict(module.named_parameters()) | dict(module.named_buffers())
    lines = sorted(f"{k}:{list(v.shape)}:{v.dtype}" for k, v in named.items())
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()


def config_hash(model_dir: str | Path) -> str:
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()


def weight_fingerprint(model_dir: str | Path) -> str:
    """A fast fingerprint of the safetensors files: names and sizes, each header (every tensor's
    name, dtype, shape and offsets) and the first and last MiB of data. Hashing all the bytes of
    a 1.5 TB checkpoint would take longer than the start-up it guards."""
    h = hashlib.sha256()
    for path in sorted(Path(model_dir).glob("*.safetensors")):
        size = path.stat().st_size
        h.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as f:
            header_len = int.from_bytes(f.read(8), "little")
            h.update(f.read(header_len))
            h.update(f.read(_SAMPLE_BYTES))
            f.seek(max(size - _SAMPLE_BYTES, 8 + header_len))
            h.update(f.read(_SAMPLE_BYTES))
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
