//! permessage-deflate (RFC 7692, contract section 8): negotiation per hop,
//! and inflating and deflating messages under caps.
//!
//! Pure building blocks: nothing here touches a socket. The session engine
//! checks RSV1, feeds frame payloads to an [`Inflater`] or [`Deflater`] per
//! hop and direction, and maps their errors to close codes.

pub mod budget;
pub mod codec;
pub mod negotiate;

pub use budget::{InflateBudget, Reservation};
pub use codec::{DeflateError, Deflater, InflateError, Inflated, Inflater};
pub use negotiate::{HopParams, Settings};
