"""The OMI side: service registry client, DICOMweb access, the Open Inference Protocol v2 client,
and the conversion of model outputs to FHIR."""
