//! The fetch protocol's wire codec: CBOR requests and responses, each read
//! with a hard size limit before it is decoded.

use super::*;

/// The fetch protocol's codec: one CBOR message per stream, read to the end
/// within a size limit, decoded by the protocol crate (which checks its
/// limits before allocating).
#[derive(Debug, Clone, Default)]
pub struct FetchCodec;

pub(super) async fn read_limited<T: futures::AsyncRead + Unpin + Send>(
    io: &mut T,
    limit: u64,
) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    io.take(limit + 1).read_to_end(&mut bytes).await?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message larger than {limit} bytes"),
        ));
    }
    Ok(bytes)
}

pub(super) fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl request_response::Codec for FetchCodec {
    type Protocol = StreamProtocol;
    type Request = FetchRequest;
    type Response = FetchResponse;

    async fn read_request<T>(&mut self, _: &Self::Protocol, io: &mut T) -> io::Result<FetchRequest>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let bytes = read_limited(io, MAX_REQUEST_BYTES).await?;
        FetchRequest::from_bytes(&bytes).map_err(invalid)
    }

    async fn read_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
    ) -> io::Result<FetchResponse>
    where
        T: futures::AsyncRead + Unpin + Send,
    {
        let bytes = read_limited(io, MAX_RESPONSE_BYTES).await?;
        FetchResponse::from_bytes(&bytes).map_err(invalid)
    }

    async fn write_request<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        request: FetchRequest,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        let bytes = request.to_bytes().map_err(invalid)?;
        io.write_all(&bytes).await?;
        io.close().await
    }

    async fn write_response<T>(
        &mut self,
        _: &Self::Protocol,
        io: &mut T,
        response: FetchResponse,
    ) -> io::Result<()>
    where
        T: futures::AsyncWrite + Unpin + Send,
    {
        let bytes = response.to_bytes().map_err(invalid)?;
        io.write_all(&bytes).await?;
        io.close().await
    }
}
