"""Handing a device over and giving it back: policy, the plan of steps, the transaction that
runs them through safeusb.host, and the one service every front end calls. Imports the
shared vocabulary, safeusb.host and safeusb.inspect."""
