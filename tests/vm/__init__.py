"""The real-kernel (VM) tier: its scenarios boot through safeusb.lab.harness."""

from pathlib import Path

#: The checkout these tests run from.
REPO = Path(__file__).resolve().parents[2]
#: The tier's guest scenario scripts and their helpers.
GUEST_DIR = Path(__file__).resolve().parent / "guest"
