"""Converts the pickled FID Inception weights to safetensors, so evaluation needs no torch.

    python -m catflax.metrics.convert_inception pt_inception-2015-12-05-6726825d.pth OUT.safetensors

Reading the pickle needs torch (loaded with weights_only=True). The file's sha256 is checked
against the prefix in its name when the name has one; the state dict is checked against the
network (every key, every shape) before anything is written.
"""

from __future__ import annotations

import argparse
import sys

from catflax.metrics import inception
from catflax.models.rngs import abstract_module
from catflax.weights import convert, io


def convert_file(src: str, dst: str) -> str:
    """Writes `dst` (.safetensors) from the FID Inception pickle `src`; returns src's sha256."""
    if not dst.endswith(".safetensors"):
        raise ValueError(f"{dst}: the output name must end in .safetensors")
    digest = inception.check_file_hash(src)
    state = inception.read_fid_state_dict(src, allow_pickle=True)
    abstract = abstract_module(lambda rngs: inception.InceptionV3(rngs=rngs))
    convert.load_state_dict(abstract, state, source_name=src)  # raises on any mismatch
    metadata = {"source": inception.FID_WEIGHTS_NAME, "source_sha256": digest}
    io.write_safetensors(dst, state, metadata=metadata)
    return digest


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m catflax.metrics.convert_inception", description=__doc__.split("\n")[0]
    )
    parser.add_argument("src", help=f"the pickled FID weights ({inception.FID_WEIGHTS_NAME})")
    parser.add_argument("dst", help="output .safetensors file")
    args = parser.parse_args(argv)
    digest = convert_file(args.src, args.dst)
    print(f"wrote {args.dst} from {args.src} (sha256 {digest})")


if __name__ == "__main__":
    main(sys.argv[1:])
