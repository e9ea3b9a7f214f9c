//! ckptfs
