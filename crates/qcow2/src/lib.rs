//! qcow2 image reader and writer (for import and export)
