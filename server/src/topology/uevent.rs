//! CPU hotplug uevents (stub; filled in by the topology reader work).
