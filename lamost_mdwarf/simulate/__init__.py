"""Survey simulator: LAMOST-like M-dwarf spectra, TCD-like labels and the truth.

Modules, from the stars to the files:

- :mod:`~lamost_mdwarf.simulate.population`: true labels, binaries, activity;
- :mod:`~lamost_mdwarf.simulate.catalog`: the TESS-Cool-Dwarf-Catalog-like label table;
- :mod:`~lamost_mdwarf.simulate.plan`: fields, visits, files, per-observation settings;
- :mod:`~lamost_mdwarf.simulate.spectra`: noise-free rest-frame spectra
  (:func:`~lamost_mdwarf.simulate.spectra.synthesize_rest_frame`);
- :mod:`~lamost_mdwarf.simulate.instrument`: noise, masks and artefacts;
- :mod:`~lamost_mdwarf.simulate.headers`: LAMOST header cards per data release;
- :mod:`~lamost_mdwarf.simulate.survey`: :func:`~lamost_mdwarf.simulate.survey.simulate_survey`,
  which ties them together and writes the files in a process pool.
"""
