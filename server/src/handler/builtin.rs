//! Built-in handlers (STUB — filled in by the handlers work).
use super::{Args, Handler, HandlerError, WorkCtx};
macro_rules! stub {
    ($t:ident, $n:expr) => {
        pub struct $t;
        impl Handler for $t {
            fn name(&self) -> &str {
                $n
            }
            fn validate(&self, _a: &Args, _p: &[u8]) -> Result<(), HandlerError> {
                Ok(())
            }
            fn run(&self, _c: &WorkCtx<'_>) -> Result<Vec<u8>, HandlerError> {
                Ok(Vec::new())
            }
        }
    };
}
stub!(Noop, "noop");
stub!(Spin, "spin");
stub!(Sleep, "sleep");
stub!(Digest, "digest");
