//! The gRPC codec of every `wqd.v1` service: prost's, except that a message that does not
//! decode is `INVALID_ARGUMENT`, not `INTERNAL`.
//!
//! tonic-prost maps every protobuf decode error (truncated or garbage bytes, a wrong wire
//! type, bad UTF-8 in a string) to `INTERNAL`, which wqd's status table reserves for its own
//! bugs; a malformed request is the caller's error. Invariant: only decode errors change
//! code; encoding, buffer settings and every other status pass through unchanged.

use prost::Message;
use tonic::codec::{BufferSettings, DecodeBuf};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT` (see the module docs).
#[derive(Debug, Clone)]
pub struct Codec<T, U>(ProstCodec<T, U>);

impl<T, U> Default for Codec<T, U> {
    fn default() -> Self {
        Codec(ProstCodec::default())
    }
}

impl<T, U> tonic::codec::Codec for Codec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = Decoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.0.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        Decoder(self.0.decoder())
    }
}

/// The decoder of [`Codec`].
#[derive(Debug)]
pub struct Decoder<U>(ProstDecoder<U>);

impl<U: Message + Default> tonic::codec::Decoder for Decoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(malformed)
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// prost's decode error (tonic-prost's `INTERNAL`) as `INVALID_ARGUMENT`.
fn malformed(st: Status) -> Status {
    if st.code() == Code::Internal {
        Status::invalid_argument(format!("malformed message: {}", st.message()))
    } else {
        st
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decode_errors_are_invalid_argument() {
        let st = malformed(Status::internal("failed to decode Protobuf message: x"));
        assert_eq!(st.code(), Code::InvalidArgument);
        assert!(st.message().starts_with("malformed message: "));
        let other = malformed(Status::resource_exhausted("big"));
        assert_eq!(other.code(), Code::ResourceExhausted);
    }
}
