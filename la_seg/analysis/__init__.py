"""`la-seg analyse`: from an LA mask and its LGE volume to what the clinic reads (surface, wall IIR map,
fibrosis fractions, Utah stage, LA size and shape, pictures). See `command.analyse`."""
