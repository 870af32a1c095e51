//! Unpacking one layer, hostile-input safe (the rules are in the module doc of
//! [`crate::image`]).
