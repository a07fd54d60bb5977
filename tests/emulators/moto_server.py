"""Start moto's server (EC2, S3, EBS direct APIs) with AWS's EBS block size.

Run with the moto venv's python; arguments are moto_server's own
(e.g. `-H 127.0.0.1 -p 5055`).

moto's StartSnapshot answers BlockSize 512 (bytes), while AWS answers 524288
(512 KiB). A client that honours the answered block size, as it must, would then
upload a disk image in 512-byte blocks: a thousand times the requests, which is
both unlike AWS and far too slow for tests. So the EBS snapshot model is made to
report 524288, as AWS does; everything else is moto's own.
"""

import functools
import sys

import moto.ebs.models
import moto.server

EBS_BLOCK_SIZE = 524288

_original_init = moto.ebs.models.EBSSnapshot.__init__


@functools.wraps(_original_init)
def _init_with_aws_block_size(self, *args, **kwargs):
    _original_init(self, *args, **kwargs)
    self.block_size = EBS_BLOCK_SIZE


moto.ebs.models.EBSSnapshot.__init__ = _init_with_aws_block_size

if __name__ == "__main__":
    moto.server.main(sys.argv[1:])
