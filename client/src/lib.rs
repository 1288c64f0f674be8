//! Client library for wqd (filled in by the daemon-and-clients work).
