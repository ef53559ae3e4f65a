//! Reading a whole HTTP body, bounded: the agent's request and the tool's response.
//!
//! `http_body_util`'s `Limited` + `collect` does the same, but keeps every body's frames in a
//! list it allocates (and grows) per body, even for the one frame nearly every body here comes
//! in (its length was declared and it arrived with the headers). This keeps that frame's bytes
//! as they are, and copies only when a second frame comes.

use bytes::{Bytes, BytesMut};
use http_body_util::BodyExt;

/// Why a body could not be read whole.
#[derive(Debug, thiserror::Error)]
pub enum BodyError<E> {
    #[error("the body is larger than {0} bytes")]
    TooLarge(usize),
    #[error("the body could not be read: {0}")]
    Read(E),
}

/// The whole body, if it is at most `limit` bytes (trailers are ignored).
pub async fn read_all<B>(body: B, limit: usize) -> Result<Bytes, BodyError<B::Error>>
where
    B: hyper::body::Body<Data = Bytes>,
{
    let mut body = std::pin::pin!(body);
    let (mut first, mut joined): (Option<Bytes>, Option<BytesMut>) = (None, None);
    let mut len = 0usize;
    while let Some(frame) = body.frame().await {
        let Ok(data) = frame.map_err(BodyError::Read)?.into_data() else {
            continue;
        };
        len += data.len();
        if len > limit {
            return Err(BodyError::TooLarge(limit));
        }
        match (&first, &mut joined) {
            (None, _) => first = Some(data),
            (Some(_), Some(all)) => all.extend_from_slice(&data),
            (Some(f), None) => {
                let mut all = BytesMut::with_capacity(len.max(2 * f.len()).min(limit));
                all.extend_from_slice(f);
                all.extend_from_slice(&data);
                joined = Some(all);
            }
        }
    }
    Ok(match (joined, first) {
        (Some(all), _) => all.freeze(),
        (None, Some(one)) => one,
        (None, None) => Bytes::new(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::StreamBody;
    use hyper::body::Frame;

    fn frames(parts: &[&'static str]) -> impl hyper::body::Body<Data = Bytes, Error = std::io::Error> {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p.as_bytes()))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn one_frame_many_frames_none_and_too_many_bytes() {
        assert_eq!(read_all(frames(&["abc"]), 3).await.unwrap(), "abc");
        assert_eq!(read_all(frames(&["ab", "c", "de"]), 5).await.unwrap(), "abcde");
        assert_eq!(read_all(frames(&[]), 0).await.unwrap(), "");
        assert!(matches!(
            read_all(frames(&["ab", "cd"]), 3).await,
            Err(BodyError::TooLarge(3))
        ));
        assert!(matches!(
            read_all(frames(&["abcd"]), 3).await,
            Err(BodyError::TooLarge(3))
        ));
    }
}
