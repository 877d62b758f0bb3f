from __future__ import annotations

from pgq.cli import main

main()
