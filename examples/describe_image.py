"""The transformers model-doc example with onevision: describe an image, then stream a second answer.

    python examples/describe_image.py [--model llava-hf/llava-onevision-qwen2-0.5b-ov-hf] [--image examples/cat.jpg]

The image is scikit-image's "chelsea" sample (CC0, photo by Stefan van der Walt).
"""

import argparse

import torch
from PIL import Image

from onevision import AutoProcessor, LlavaOnevisionForConditionalGeneration

parser = argparse.ArgumentParser()
parser.add_argument("--model", default="llava-hf/llava-onevision-qwen2-0.5b-ov-hf")
parser.add_argument("--image", default="examples/cat.jpg")
args = parser.parse_args()

dtype = torch.float16 if torch.cuda.is_available() else torch.float32
processor = AutoProcessor.from_pretrained(args.model)
model = LlavaOnevisionForConditionalGeneration.from_pretrained(args.model, dtype=dtype, device_map="auto")

conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in this image?"}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=Image.open(args.image), text=prompt, return_tensors="pt").to(model.device, dtype)

output = model.generate(**inputs, max_new_tokens=60, do_sample=False)
print(processor.decode(output[0][inputs["input_ids"].shape[1]:], skip_special_tokens=True))

for piece in model.stream(**inputs, processor=processor, max_new_tokens=60, do_sample=True, temperature=0.7, seed=0):
    print(piece, end="", flush=True)
print()
