"""Shards from a folder of still images plus a captions CSV/JSONL (joint image-video training).

Same as `cascade data images`:

    python data/images.py --images laion-subset/images --captions laion-subset/captions.jsonl --out shards/images \
        --max-size 512 --samples-per-shard 1024 --workers 8

See data/README.md for the layout, the columns and what gets skipped.
"""

import sys

if __name__ == "__main__":  # guarded: the conversion workers re-import this file when they start
    from cascade.cli import main

    sys.exit(main(["data", "images", *sys.argv[1:]]))
