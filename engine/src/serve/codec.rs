//! The gRPC codec of the Panes API: prost's, except that a request that is not valid
//! protobuf of its type is the caller's mistake, `INVALID_ARGUMENT`. tonic-prost
//! reports every decode error as `INTERNAL`, which tells a client that the server has
//! a bug and is worth retrying.
//!
//! Generated code names it through `tonic_prost_build`'s `codec_path` (see
//! `build.rs`), so the clients in `proto` use it too: a reply that does not decode is
//! then `INVALID_ARGUMENT` on the client side as well, with the decoder's message.

use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder};
use tonic::{Code, Status};
use tonic_prost::{ProstCodec, ProstDecoder, ProstEncoder};

/// [`ProstCodec`] with decode errors as `INVALID_ARGUMENT`.
#[derive(Debug, Clone)]
pub struct PanesCodec<T, U> {
    inner: ProstCodec<T, U>,
}

impl<T, U> Default for PanesCodec<T, U> {
    fn default() -> Self {
        PanesCodec {
            inner: ProstCodec::default(),
        }
    }
}

impl<T, U> Codec for PanesCodec<T, U>
where
    T: prost::Message + Send + 'static,
    U: prost::Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = InvalidArgumentDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        self.inner.encoder()
    }

    fn decoder(&mut self) -> Self::Decoder {
        InvalidArgumentDecoder(self.inner.decoder())
    }
}

/// prost's decoder, its errors made `INVALID_ARGUMENT`.
#[derive(Debug)]
pub struct InvalidArgumentDecoder<U>(ProstDecoder<U>);

impl<U: prost::Message + Default> Decoder for InvalidArgumentDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, src: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(src).map_err(|s| match s.code() {
            Code::Internal => Status::invalid_argument(format!(
                "the message is not a valid protobuf encoding of its type: {}",
                s.message()
            )),
            _ => s,
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}
