//! Reading sysfs/procfs (stub; filled in by the topology reader work).
