//! kache-node library.
