"""Shards from WebVid-style data: a folder of videos plus the captions CSV/JSONL. Same as `cascade data videos`.

    python data/webvid.py --videos webvid/videos --captions webvid/results_2M_val.csv --out shards/webvid-val \
        --max-size 512 --samples-per-shard 256 --workers 8

See data/README.md for the layout, the columns and what gets skipped.
"""

import sys

if __name__ == "__main__":  # guarded: the conversion workers re-import this file when they start
    from cascade.cli import main

    sys.exit(main(["data", "videos", *sys.argv[1:]]))
